"""The session plane: ``protocol`` (the rules, sans-I/O), ``actor`` (the asyncio shell), ``spec``."""
