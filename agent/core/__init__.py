"""The agent's decisions as pure code: no I/O, no asyncio, no clock of their own."""
