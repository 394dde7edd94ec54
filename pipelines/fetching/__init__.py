"""Network fetching shared by the pipelines: host lookup and URL policy, URL-list pages, image downloads."""
