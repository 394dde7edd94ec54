"""One pipeline: BLIP CapFilt over pairs (synthetic captions by nucleus sampling, ITM filter)."""
