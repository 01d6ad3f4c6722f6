import pytest
import torch

from qiusuo.model import ModelConfig, Transformer
from qiusuo.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.char_level()


def tiny_model(tok, seed=0, **kw) -> Transformer:
    """A small random model whose biases and norm gains are perturbed, so tests exercise them."""
    torch.manual_seed(seed)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    shape.update(kw)
    cfg = ModelConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **shape)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def model(tok):
    return tiny_model(tok)
