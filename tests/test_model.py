from runner.model import load_spec


def test_llama_405b_from_catalog():
    spec = load_spec("meta-llama/Llama-3.1-405B-Instruct")
    assert spec.source == "catalog"
    assert spec.num_layers == 126
    assert spec.parameter_count() * 2 == 811_706_777_600
    assert spec.kv_bytes_per_token(2) == 516_096
