"""kvuring: an asyncio-native KV-cache block store on io_uring."""
