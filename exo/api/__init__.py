"""HTTP APIs in front of a node, and the chat page they serve."""

from exo.api.chatgpt_api import ChatGPTAPI

__all__ = ["ChatGPTAPI"]
