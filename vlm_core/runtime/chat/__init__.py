"""Chats: messages normalised once, the chat template rendered without transformers, conversations, tools."""
