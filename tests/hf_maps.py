"""Map timm ViT weights onto transformers' ViT layers, for the parity tests."""


def hf_block_weights(ours: dict, prefix: str, hf_prefix: str, hf_keys: set) -> dict:
    """Map one timm Block (fused qkv) onto a transformers ViT layer (separate q/k/v), for either naming scheme
    transformers has used (4.x: attention.attention.query / 5.x: attention.q_proj)."""
    d = ours[f"{prefix}.attn.qkv.weight"].shape[1]
    qkv_w, qkv_b = ours[f"{prefix}.attn.qkv.weight"], ours[f"{prefix}.attn.qkv.bias"]
    new_names = f"{hf_prefix}.attention.q_proj.weight" in hf_keys
    q, k, v, o = (
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
        if new_names
        else (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        )
    )
    fc1, fc2 = ("mlp.fc1", "mlp.fc2") if new_names else ("intermediate.dense", "output.dense")
    out = {}
    for i, name in enumerate((q, k, v)):
        out[f"{hf_prefix}.{name}.weight"] = qkv_w[i * d : (i + 1) * d]
        out[f"{hf_prefix}.{name}.bias"] = qkv_b[i * d : (i + 1) * d]
    pairs = {o: "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2", fc1: "mlp.fc1", fc2: "mlp.fc2"}
    for hf, mine in pairs.items():
        for p in ("weight", "bias"):
            out[f"{hf_prefix}.{hf}.{p}"] = ours[f"{prefix}.{mine}.{p}"]
    return out


def hf_vit_weights(ours: dict, enc: str, hf_keys: set, depth: int) -> dict:
    """timm ViT `enc`.* (patch embed, cls, pos, blocks, norm) -> transformers `vit.*` names."""
    layers = "vit.layers" if any(k.startswith("vit.layers.") for k in hf_keys) else "vit.encoder.layer"
    out = {
        "vit.embeddings.cls_token": ours[f"{enc}.cls_token"],
        "vit.embeddings.position_embeddings": ours[f"{enc}.pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": ours[f"{enc}.patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": ours[f"{enc}.patch_embed.proj.bias"],
        "vit.layernorm.weight": ours[f"{enc}.norm.weight"],
        "vit.layernorm.bias": ours[f"{enc}.norm.bias"],
    }
    for i in range(depth):
        out.update(hf_block_weights(ours, f"{enc}.blocks.{i}", f"{layers}.{i}", hf_keys))
    return out
