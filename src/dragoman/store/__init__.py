"""The Redis core: key names, Lua transition scripts, and the async Store over them."""
