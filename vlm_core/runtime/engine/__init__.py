"""The engine: continuous batching of many sequences over one exported decoder.

- step_loop.py: the step loop (admit, prefill a chunk or an image, one batched decode call, retire);
- decode_plan.py: a decode step's decoder calls, planned from the rows that asked for batch invariance;
- sequence.py: one request inside the engine (tokens, sampler, constraint, stop state);
- kv_slots.py: the KV rows of the engine's sequences, prompt and answer in one row; kv_buffer.py: one
  sequence's KV for the facade's one-off calls, and the growth rule;
- prefix_cache.py: the KV of finished sequences and the vision features of seen images, in one budget;
- runner.py: the model runner (sessions, embeddings, decoder and vision calls, new caches), shared with the facade;
- decoder_call.py: one decoder call with the KV cache bound in place; onnx_sessions.py: ONNX Runtime sessions.
"""
