from hjcg_client.client import HjcgClient

__all__ = ["HjcgClient"]
