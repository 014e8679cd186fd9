"""Cached attention as ONNX Runtime's fused `com.microsoft.GroupQueryAttention` op (format_version 2).

The decoder graphs call `group_query_attention` once per layer. Under `torch.onnx.export` it becomes one
GroupQueryAttention node; run eagerly it computes the same thing in torch (`_eager`), the op's meaning
written down and checked against ONNX Runtime by tests/test_decoder_call.py.

What the op does, per batch row b (ORT's `group_query_attention_helper.h`; EXPORT-NOTES.md):
- the row holds `total_b = seqlens_k[b] + 1` tokens after this call, of which the last S are the new ones;
- the new keys/values are written into past_key/past_value at slots [total_b - S, total_b) and the
  buffers come back as present_key/present_value. When the runtime binds the same buffer as past and
  present (IO binding), the write happens in place: no step copies the cache;
- each new token attends over slots [0, its own position] (causal), so slots past `total_b` (unused
  capacity, other rows' longer histories) are never read: a row's result does not depend on the buffer's
  capacity or on the other rows;
- rotary is applied before the op (`do_rotary=0`): Qwen3-VL's M-RoPE needs its own 3-D positions.

ONNX Runtime's limits (CPU): a call with S > 1 on a non-empty past needs batch 1 (the runtime prefills one
sequence at a time), and q/k/v/past share one dtype: a float16 cache means float16 q/k/v and output.
"""
from __future__ import annotations

import torch


def group_query_attention(q, k, v, past_key, past_value, seqlens_k, total_length, num_heads: int,
                          num_kv_heads: int, scale: float):
    """q [B, S, heads*d], k/v [B, S, kv*d] (rotary applied), past_key/value [B, kv, C, d], seqlens_k int32 [B]
    (each row's length after this call, minus 1), total_length int32 scalar (the longest row's length).

    Returns (out [B, S, heads*d] in q's dtype, present_key, present_value [B, kv, C, d])."""
    dtype = past_key.dtype  # the op takes q/k/v in the cache's dtype
    q_in, k_in, v_in = (x.to(dtype) for x in (q, k, v))
    if torch.onnx.is_in_onnx_export():
        out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention", [q_in, k_in, v_in, past_key, past_value, seqlens_k, total_length],
            {"num_heads": num_heads, "kv_num_heads": num_kv_heads, "scale": float(scale), "do_rotary": 0},
            dtypes=[dtype, dtype, dtype], shapes=[q_in.shape, past_key.shape, past_value.shape], version=1)
    else:
        out, present_key, present_value = _eager(q_in, k_in, v_in, past_key, past_value, seqlens_k, num_heads,
                                                 num_kv_heads, scale)
    return out.to(q.dtype), present_key, present_value


def _eager(q, k, v, past_key, past_value, seqlens_k, num_heads, num_kv_heads, scale):
    """The op in torch, row by row (float32 maths, results in the inputs' dtype)."""
    batch, seq, _ = q.shape
    head_dim = past_key.shape[-1]
    present_key, present_value = past_key.clone(), past_value.clone()
    q = q.float().view(batch, seq, num_heads, head_dim).transpose(1, 2)  # [B, heads, S, d]
    k = k.view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    outputs = []
    for b in range(batch):
        total = int(seqlens_k[b]) + 1
        start = total - seq
        present_key[b, :, start:total] = k[b]
        present_value[b, :, start:total] = v[b]
        keys = present_key[b, :, :total].float().repeat_interleave(num_heads // num_kv_heads, dim=0)
        values = present_value[b, :, :total].float().repeat_interleave(num_heads // num_kv_heads, dim=0)
        scores = torch.matmul(q[b], keys.transpose(-1, -2)) * scale  # [heads, S, total]
        visible = torch.arange(total)[None, :] <= (start + torch.arange(seq))[:, None]  # [S, total]
        scores = scores.masked_fill(~visible, float("-inf"))
        outputs.append(torch.matmul(torch.softmax(scores, dim=-1), values).transpose(0, 1).reshape(seq, -1))
    return torch.stack(outputs).to(past_key.dtype), present_key, present_value


def example_lengths(batch: int, seq: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """seqlens_k and total_sequence_length for tracing: every row full (capacity slots, the last `seq` new)."""
    return torch.full((batch,), capacity - 1, dtype=torch.int32), torch.tensor(capacity, dtype=torch.int32)
