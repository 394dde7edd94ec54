"""Pure filtering functions: no Beam, no network, no file I/O."""
