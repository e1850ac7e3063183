from pathlib import Path

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.spec import TensorSpec, example_sizes, load_toml_specs, synthetic


def test_parse_round_trip() -> None:
    s = TensorSpec.parse("ids:int64[batch,seq]@0..999")
    assert (s.name, s.dtype, s.shape, s.value_range) == ("ids", "int64", ("batch", "seq"), (0, 999))
    assert s.dynamic_dims == {0: "batch", 1: "seq"}
    assert TensorSpec.parse(str(s)) == s
    assert TensorSpec.from_dict(s.to_dict()) == s
    assert TensorSpec.parse("image:float32[batch,1,8,8]").shape == ("batch", 1, 8, 8)
    assert TensorSpec.parse("scalar:float32[]").shape == ()


@pytest.mark.parametrize("text,needle", [
    ("image float32[batch]", "cannot parse"),
    ("image:float33[batch]", "unknown dtype"),
    ("image:float32[batch,-1]", "negative"),
    ("image:float32[batch,1x]", "bad dimension"),
])
def test_parse_errors(text: str, needle: str) -> None:
    with pytest.raises(KilnError, match=needle) as e:
        TensorSpec.parse(text)
    assert e.value.hint


def test_matches_and_synthetic() -> None:
    s = TensorSpec.parse("ids:int64[batch,seq]@3..5")
    assert s.matches((2, 9)) and not s.matches((2,)) and not s.matches((2, 3, 4))
    a = synthetic(s, {"batch": 4, "seq": 6}, np.random.default_rng(0))
    assert a.shape == (4, 6) and a.dtype == np.int64 and a.min() >= 3 and a.max() <= 5
    sizes = example_sizes([s])
    assert len(set(sizes.values())) == 2 and min(sizes.values()) >= 2  # distinct, never 0/1


def test_toml(tmp_path: Path) -> None:
    f = tmp_path / "kiln.toml"
    f.write_text('name = "m"\n[[inputs]]\nname = "x"\ndtype = "float32"\nshape = ["batch", 3]\n')
    assert load_toml_specs(f) == ("m", [TensorSpec("x", "float32", ("batch", 3))])
    f.write_text("name = ")
    with pytest.raises(KilnError, match="cannot read"):
        load_toml_specs(f)


def test_synthetic_masks_are_valid_prefixes_and_token_types_zero() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    mask = synthetic(TensorSpec.parse("attention_mask:int64[batch,seq]@0..1"), {"batch": 16, "seq": 12}, rng)
    lengths = mask.sum(1)
    assert lengths.min() >= 1 and lengths[0] == 12 and len(set(lengths.tolist())) > 3
    for row, n in zip(mask, lengths):  # ones, then zeros: what a tokenizer makes
        assert row[:n].all() and not row[n:].any()
    types = synthetic(TensorSpec.parse("token_type_ids:int64[batch,seq]@0..1"), {"batch": 4, "seq": 5}, rng)
    assert not types.any()


def test_output_kinds_from_the_command_line_and_toml(tmp_path: Path) -> None:
    from kiln.errors import KilnError
    from kiln.spec import load_toml_outputs, parse_output_kind

    assert parse_output_kind("embedding:embedding") == ("embedding", "embedding")
    with pytest.raises(KilnError, match="cannot parse output kind"):
        parse_output_kind("embedding:cosine")
    f = tmp_path / "kiln.toml"
    f.write_text('[[outputs]]\nname = "emb"\nkind = "embedding"\n')
    assert load_toml_outputs(f) == {"emb": "embedding"}
    f.write_text('[[outputs]]\nname = "emb"\nknid = "embedding"\n')
    with pytest.raises(KilnError, match="needs name and kind"):
        load_toml_outputs(f)
    assert TensorSpec.from_dict({"name": "ids", "dtype": "int64", "shape": ["batch", "seq<=512"]}).limits == {"seq": 512}
