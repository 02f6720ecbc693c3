"""The studio and the OpenAI-style API (`tinygemma serve`): settings, decoding engine, request schema, app."""
