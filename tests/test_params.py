"""ParamSlots: a module's parameters read from cached slots, and every way a weight can change is seen."""

from __future__ import annotations

import torch
from torch import nn

from fastenc.backends.params import REGISTRATIONS, ParamSlots
from fastenc.model import T5Encoder
from reference import TINY


def test_slots_read_what_parameters_reads_without_walking_again():
    model = T5Encoder(TINY)
    slots = ParamSlots(model)
    assert [id(p) for p in slots.tensors()] == [id(p) for p in model.parameters()]
    at = REGISTRATIONS[0]
    slots.tensors()
    assert slots._at == at  # no registration since: the same slots


def test_every_kind_of_weight_change_changes_the_signature_or_versions():
    model = T5Encoder(TINY)
    slots = ParamSlots(model)
    sig, ver = slots.signature(), slots.versions()
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # in place: same storage, new version
    assert slots.signature() == sig and slots.versions() != ver
    ver = slots.versions()
    model.final_norm.weight.data = model.final_norm.weight.data.clone()  # new storage, same Parameter object
    assert slots.signature() != sig and slots.versions() != ver
    sig = slots.signature()
    model.final_norm.weight = nn.Parameter(torch.ones_like(model.final_norm.weight))  # a new Parameter
    assert slots.signature() != sig
    assert [id(p) for p in slots.tensors()] == [id(p) for p in model.parameters()]
    sig = slots.signature()
    model.float().to(torch.bfloat16)  # a cast: new storages
    assert slots.signature() != sig and all(p.dtype == torch.bfloat16 for p in slots.tensors())
