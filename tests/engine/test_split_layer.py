"""offload.split_layer outside training: a split Llama layer computes what it did, its weights keep
their names, and layers of another shape are left alone. (Training through the split blocks needs
CUDA: tests/engine/test_gpu_fast_paths.py compares it with the whole layer's checkpoint there.)"""

import torch

from qlora_studio.engine.offload import split_layer


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_a_split_layer_computes_the_same_outside_training():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    names = sorted(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert all(split_layer(layer) for layer in model.model.layers)
    assert sorted(model.state_dict()) == names
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # evaluation
        model.train()
        assert torch.equal(model(input_ids=ids).logits, before)  # training mode, but no gradients: no checkpoint


def test_a_layer_of_another_shape_is_not_split():
    model = _tiny_llama()
    layer = model.model.layers[0]
    layer.add_module("post_feedforward_layernorm", torch.nn.Identity())  # as Gemma 2's four norms
    forwards = {name: child.forward for name, child in layer.named_children()}
    assert split_layer(layer) is False
    assert {name: child.forward for name, child in layer.named_children()} == forwards


def test_token_tiles_cover_every_token_once_in_near_equal_ranges():
    from qlora_studio.engine.offload import token_tiles

    assert token_tiles(torch.empty(2, 1024, 8), 2048) is None  # fits in one range
    assert token_tiles(torch.empty(4, 1024, 8), None) is None
    assert token_tiles(torch.empty(4, 1024, 8), 2048) == [slice(0, 2048), slice(2048, 4096)]
    tiles = token_tiles(torch.empty(5, 1000, 8), 2048)  # 5,000 tokens: three ranges of at most 2,048
    assert len(tiles) == 3 and all(t.stop - t.start <= 2048 for t in tiles)
    covered = [i for t in tiles for i in range(t.start, t.stop)]
    assert covered == list(range(5000))
    assert len({t.stop - t.start for t in tiles[:-1]}) == 1


def test_a_token_wise_block_in_ranges_gives_the_whole_blocks_output_and_gradients():
    """offload's tiled passes (what the MLP block runs on a GPU): forward under no_grad, then each
    range recomputed and differentiated; the same output and gradients as the whole block."""
    from qlora_studio.engine.offload import _tiled_backward, tiled_forward, token_tiles

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(64)
    up, down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def block(h):
        return down(torch.nn.functional.silu(up(norm(h))))

    x = torch.randn(3, 50, 64, dtype=torch.float64)
    g = torch.randn(3, 50, 64, dtype=torch.float64)
    for m in (norm, up, down):
        m.double()
    tiles = token_tiles(x, 64)
    assert len(tiles) == 3
    with torch.no_grad():
        torch.testing.assert_close(tiled_forward(block, x, tiles), block(x))

    whole = x.clone().requires_grad_()
    block(whole).backward(g)
    expected = [p.grad.clone() for p in (*up.parameters(), *down.parameters(), norm.weight)]
    for p in (*up.parameters(), *down.parameters(), norm.weight):
        p.grad = None
    grad_in = _tiled_backward(block, x.clone().requires_grad_(), g, tiles)
    torch.testing.assert_close(grad_in, whole.grad)
    for p, e in zip((*up.parameters(), *down.parameters(), norm.weight), expected):
        torch.testing.assert_close(p.grad, e)
    assert _tiled_backward(block, x.clone(), g, tiles) is None  # an input that needs no gradient


class _Param:
    def __init__(self, nbytes: int, element_size: int = 2):
        self.is_cuda, self._n, self._e = True, nbytes // element_size, element_size

    def numel(self):
        return self._n

    def element_size(self):
        return self._e


class _Model:
    """What offload.mlp_tile reads of a model: its intermediate size, its parameters on the GPU and
    the compute dtype (that of the input embedding)."""

    def __init__(self, intermediate: int, resident: int):
        import types

        self.config = types.SimpleNamespace(intermediate_size=intermediate)
        self._params = [_Param(resident)]

    def parameters(self):
        return iter(self._params)

    def get_input_embeddings(self):
        import types

        return types.SimpleNamespace(weight=_Param(2))


def test_the_mlp_runs_in_ranges_only_where_its_intermediate_is_a_sizeable_share_of_the_memory():
    from qlora_studio.engine.offload import MLP_TILE_TOKENS, mlp_tile

    # the 1B benchmark shape: 4 × 1,024 tokens × 8,192 × 2 bytes = 67 MB against 1.07 GB of parameters
    assert mlp_tile(_Model(8192, 1_070_000_000), 4096) == MLP_TILE_TOKENS
    # the 8B one: 117 MB against 4.8 GB, whole
    assert mlp_tile(_Model(14336, 4_800_000_000), 4096) is None
    # ... but in ranges for long sequences (16,384 tokens: 470 MB)
    assert mlp_tile(_Model(14336, 4_800_000_000), 16384) == MLP_TILE_TOKENS
    assert mlp_tile(_Model(8192, 1_000), MLP_TILE_TOKENS) is None  # one range holds them all anyway
    assert mlp_tile(_Model(8192, 1_000), None) is None
