"""The ground floor: config loading, the RoPE spec, atomic files, layer names. Imports no other layer."""
