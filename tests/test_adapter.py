"""Adapter payloads round-trip through PEFT directories."""

from __future__ import annotations

import pytest

from opsd.adapter import AdapterError, AdapterPayload, read_adapter_dir, write_adapter_dir


def test_payload_round_trip_and_properties(tmp_path):
    payload = AdapterPayload(3, b"weights", {"r": 8, "target_modules": ["v_proj", "q_proj"],
                                             "base_model_name_or_path": "tiny"})
    folder = write_adapter_dir(payload, tmp_path / "v3")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    back = read_adapter_dir(folder, version=3)
    assert back == payload
    assert (back.rank, back.target_modules, back.base_model) == (8, ["q_proj", "v_proj"], "tiny")
    write_adapter_dir(AdapterPayload(4, b"new", {"r": 8}), folder)  # replaces in place
    assert read_adapter_dir(folder, 4).weights == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["v3"]  # no temp dirs left


def test_broken_adapter_dirs_are_refused(tmp_path):
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        read_adapter_dir(tmp_path, 1)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="invalid JSON"):
        read_adapter_dir(tmp_path, 1)
