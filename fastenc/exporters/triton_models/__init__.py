"""Sources of the python-backend models ``fastenc triton-repo`` copies into a Triton repository as
``1/model.py``. They run inside Triton's python backend (``triton_python_backend_utils``), not in
fastenc: nothing imports them here.

* ``tokenizer_model.py`` — text -> input_ids, attention_mask, encoder_attention_mask (fastenc's tokenizer);
* ``onnx_encoder_model.py`` — the exported ONNX encoder through ONNX Runtime, for servers whose
  only backend is python.
* ``fastenc_encoder_model.py`` — fastenc's own ``cpu`` backend (bf16 + planned int8 GEMMs) on the
  checkpoint's weights (``--encoder-backend fastenc-cpu``).
"""
