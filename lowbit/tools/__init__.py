"""Model tools on top of the ops and layers: ``quantize`` / ``swap_fused`` (float model -> fake-quant training model),
``convert`` (trained model -> packed integer layers), ``serialization`` (safetensors + JSON files, no pickle) and
``bops`` (the one cost model: MACs, BOPs, model bytes)."""
