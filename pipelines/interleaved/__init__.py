"""One pipeline: Common Crawl WARCs, URL lists and HTML folders -> interleaved documents (OBELICS/M3W style)."""
