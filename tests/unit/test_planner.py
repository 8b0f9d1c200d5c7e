from deltafleet.server.planner import FullArtifact, VariantOption, choose_variant, delta_worth_it

ONNX = VariantOption(1, "default", "onnx", "fp32", "a" * 64, 100)
TFL = VariantOption(2, "tflite-int8", "tflite", "int8", "b" * 64, 30)
PACKED = VariantOption(3, "default", "onnx", "fp32", "c" * 64, 100,
                       compressed=FullArtifact("zstd", "d" * 64, 80))


def test_device_gets_the_variant_its_runtime_can_load():
    assert choose_variant({"litert": "2.3"}, None, [ONNX, TFL]).variant == TFL
    assert choose_variant({"onnxruntime": "1.20"}, None, [ONNX, TFL]).variant == ONNX


def test_device_keeps_the_variant_it_already_runs():
    both = {"onnxruntime": "1", "litert": "2"}
    assert choose_variant(both, "tflite-int8", [ONNX, TFL]).variant == TFL
    assert choose_variant(both, None, [ONNX, TFL]).variant == ONNX


def test_device_without_a_fitting_runtime_is_told_why():
    choice = choose_variant({}, None, [ONNX])
    assert choice.variant is None and "no variant" in choice.reason


def test_delta_must_save_at_least_ten_percent():
    assert delta_worth_it(90, 100)
    assert not delta_worth_it(91, 100)
    assert not delta_worth_it(None, 100)


def test_full_artifact_is_the_compressed_model_when_the_catalog_has_one():
    assert PACKED.full == FullArtifact("zstd", "d" * 64, 80)
    assert ONNX.full == FullArtifact("identity", "a" * 64, 100)  # registered before, or no gain


def test_delta_is_weighed_against_the_compressed_model_not_the_file():
    assert delta_worth_it(85, PACKED.size_bytes)  # 15% under the model file ...
    assert not delta_worth_it(85, PACKED.full.size_bytes)  # ... but only 6% under what ships
    assert delta_worth_it(72, PACKED.full.size_bytes)
