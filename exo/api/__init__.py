"""HTTP APIs in front of a node."""

from exo.api.chatgpt_api import ChatGPTAPI

__all__ = ["ChatGPTAPI"]
