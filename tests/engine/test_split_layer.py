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
