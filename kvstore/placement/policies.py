from .eviction import EvictionQueue
POLICIES = {"lru": EvictionQueue}
