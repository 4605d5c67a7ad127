"""The engines that generate audio: one module per provider API, behind the Engine protocol in base."""
