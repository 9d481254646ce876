//! Tests of request bodies and response parsing.

use super::*;
use serde_json::json;

const GREY: ImageShape = ImageShape {
    height: 2,
    width: 2,
    channels: 1,
};

fn enc(layout: TensorLayout) -> Encoding {
    Encoding {
        layout,
        datatype: Datatype::Fp32,
        scale: 1.0 / 255.0,
        mean: vec![],
        std: vec![],
    }
}

#[test]
fn layouts_order_values_as_named() {
    let s = ImageShape {
        height: 1,
        width: 2,
        channels: 3,
    };
    let img = [1, 2, 3, 4, 5, 6];
    let e = Encoding {
        layout: TensorLayout::Nchw,
        datatype: Datatype::Uint8,
        scale: 1.0,
        mean: vec![],
        std: vec![],
    };
    assert_eq!(e.values(&img, s), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    let e = Encoding {
        layout: TensorLayout::Nhwc,
        ..e
    };
    assert_eq!(e.values(&img, s), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let e = Encoding {
        datatype: Datatype::Fp64,
        scale: 0.5,
        mean: vec![1.0, 2.0, 3.0],
        std: vec![2.0],
        ..e
    };
    assert_eq!(
        e.values(&img, s)[..3],
        [(0.5 - 1.0) / 2.0, (1.0 - 2.0) / 2.0, (1.5 - 3.0) / 2.0]
    );
}

#[test]
fn table_encoding_writes_what_the_serialiser_writes() {
    let s = ImageShape {
        height: 2,
        width: 3,
        channels: 3,
    };
    let img: Vec<u8> = (0..18).map(|v| (v * 37 % 256) as u8).collect();
    for layout in [TensorLayout::Nchw, TensorLayout::Nhwc, TensorLayout::Flat] {
        for datatype in [Datatype::Fp32, Datatype::Fp64, Datatype::Uint8] {
            let e = Encoding {
                layout,
                datatype,
                scale: 1.0 / 255.0,
                mean: vec![0.5, 0.4, 0.3],
                std: vec![0.2, 0.25, 0.3],
            };
            let dims = e.image_dims(s);
            let want = serde_json::to_vec(&Nested {
                dims: &dims,
                data: &e.values(&img, s),
                datatype,
            })
            .unwrap();
            let mut got = Vec::new();
            e.write_nested(&img, s, &e.table(3), &mut got);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap(),
                "{layout:?} {datatype:?}"
            );
        }
    }
}

#[test]
fn v2_requests_carry_shape_datatype_and_data() {
    let body = v2_request(
        &[vec![0, 255, 0, 255]],
        GREY,
        &enc(TensorLayout::Nchw),
        "img",
        Some("predict_proba"),
        "q1",
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["inputs"][0]["shape"], json!([1, 1, 2, 2]));
    assert_eq!(v["inputs"][0]["datatype"], "FP32");
    assert_eq!(v["inputs"][0]["data"], json!([0.0, 1.0, 0.0, 1.0]));
    assert_eq!(v["outputs"][0]["name"], "predict_proba");
}

#[test]
fn v2_responses_in_every_observed_form_parse() {
    // MLServer: FP64, parameters {}; KServe: nulls; Triton: FP32 plus a label output.
    let mls = json!({"model_name":"m","id":"x","parameters":{},"outputs":[{"name":"predict_proba","shape":[2,3],"datatype":"FP64","parameters":{"content_type":"np"},"data":[0.2,0.3,0.5,1.0,0.0,0.0]}]});
    let p = v2_response(&mls, 2, None, OutputKind::Probabilities, None).unwrap();
    assert_eq!(p[0], Prediction::Probs(vec![0.2, 0.3, 0.5]));
    let kserve = json!({"model_name":"m","model_version":null,"id":"x","parameters":null,"outputs":[{"name":"output-0","shape":[1,2],"datatype":"FP64","parameters":null,"data":[[0.25,0.75]]}]});
    assert_eq!(
        v2_response(&kserve, 1, None, OutputKind::Probabilities, None).unwrap()[0].label(),
        Some(1)
    );
    let triton = json!({"outputs":[{"name":"label","datatype":"INT64","shape":[1,1],"data":[4]},{"name":"probs","datatype":"FP32","shape":[1,2],"data":[0.5,0.5]}]});
    assert_eq!(
        v2_response(&triton, 1, None, OutputKind::Labels, None).unwrap()[0],
        Prediction::Label(4)
    );
    assert!(matches!(
        v2_response(&triton, 1, None, OutputKind::Probabilities, None).unwrap()[0],
        Prediction::Probs(_)
    ));
    let classification = json!({"outputs":[{"name":"probs","datatype":"BYTES","shape":[1,3],"data":["1.000000:7","0.000000:5","0.000000:1"]}]});
    assert_eq!(
        v2_response(&classification, 1, Some("probs"), OutputKind::Labels, None).unwrap()[0],
        Prediction::Label(7)
    );
    let mls_label =
        json!({"outputs":[{"name":"predict","shape":[1,1],"datatype":"INT64","data":[0]}]});
    assert_eq!(
        v2_response(&mls_label, 1, None, OutputKind::Labels, None).unwrap()[0],
        Prediction::Label(0)
    );
}

#[test]
fn invalid_v2_responses_are_errors_not_data() {
    let bad_sum =
        json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[0.7,0.7]}]});
    assert!(
        v2_response(&bad_sum, 1, None, OutputKind::Probabilities, None)
            .unwrap_err()
            .contains("sum to 1.4")
    );
    let logits =
        json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[3.0,-1.0]}]});
    assert!(
        v2_response(&logits, 1, None, OutputKind::Probabilities, None)
            .unwrap_err()
            .contains("outside [0, 1]")
    );
    let Prediction::Probs(p) = &v2_response(&logits, 1, None, OutputKind::Logits, None).unwrap()[0]
    else {
        panic!()
    };
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12 && p[0] > 0.98);
    let short =
        json!({"outputs":[{"name":"p","shape":[2,2],"datatype":"FP32","data":[0.5,0.5,0.5]}]});
    assert!(
        v2_response(&short, 2, None, OutputKind::Probabilities, None)
            .unwrap_err()
            .contains("holds 4 values")
    );
    let wrong_batch =
        json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[0.5,0.5]}]});
    assert!(v2_response(&wrong_batch, 3, Some("p"), OutputKind::Probabilities, None).is_err());
    let missing =
        json!({"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[0.5,0.5]}]});
    assert!(
        v2_response(&missing, 1, Some("q"), OutputKind::Probabilities, None)
            .unwrap_err()
            .contains("outputs: p")
    );
    assert!(
        v2_response(
            &json!({"error": "x"}),
            1,
            None,
            OutputKind::Probabilities,
            None
        )
        .is_err()
    );
}

#[test]
fn tf_serving_nan_tokens_become_validation_errors() {
    let v = lenient_json(
        br#"{"predictions": [[NaN, 0.5], [0.5, 0.5]], "note": "NaN inside a string"}"#,
    )
    .unwrap();
    assert_eq!(v["note"], "NaN inside a string");
    let e = instance_prediction(
        &v["predictions"][0],
        None,
        OutputKind::Probabilities,
        None,
        "image 0",
    )
    .unwrap_err();
    assert!(e.contains("non-finite"), "{e}");
    assert!(lenient_json(b"{\"a\": -Infinity}").unwrap()["a"].is_null());
}

#[test]
fn instance_predictions_accept_rows_labels_and_named_outputs() {
    let names = vec!["cat".to_string(), "dog".to_string()];
    assert_eq!(
        instance_prediction(
            &json!([0.1, 0.9]),
            None,
            OutputKind::Probabilities,
            None,
            "i"
        )
        .unwrap()
        .label(),
        Some(1)
    );
    assert_eq!(
        instance_prediction(&json!(2), None, OutputKind::Labels, None, "i").unwrap(),
        Prediction::Label(2)
    );
    assert_eq!(
        instance_prediction(&json!("dog"), None, OutputKind::Labels, Some(&names), "i").unwrap(),
        Prediction::Label(1)
    );
    let named = json!({"probabilities": [0.6, 0.4], "classes": 0});
    assert_eq!(
        instance_prediction(&named, None, OutputKind::Probabilities, None, "i")
            .unwrap()
            .label(),
        Some(0)
    );
    assert_eq!(
        instance_prediction(&named, None, OutputKind::Labels, None, "i").unwrap(),
        Prediction::Label(0)
    );
    assert!(
        instance_prediction(&json!(3), None, OutputKind::Probabilities, None, "i")
            .unwrap_err()
            .contains("labels")
    );
}

#[test]
fn torchserve_top_k_keeps_order_and_maps_names() {
    let names: Vec<String> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let v = json!({"c": 0.7, "a": 0.2, "f": 0.05});
    let p = torchserve_prediction(&v, OutputKind::Probabilities, Some(&names)).unwrap();
    assert_eq!(p, Prediction::TopK(vec![(2, 0.7), (0, 0.2), (5, 0.05)]));
    assert_eq!(p.prob_bounds(2), Some((0.7, 0.7)));
    assert_eq!(p.prob_bounds(1), Some((0.0, 0.05)));
    let idx = json!({"0": 0.9999999985349382, "5": 4.43e-10});
    assert_eq!(
        torchserve_prediction(&idx, OutputKind::Probabilities, None)
            .unwrap()
            .label(),
        Some(0)
    );
    assert!(torchserve_prediction(&json!({"x": 0.5}), OutputKind::Probabilities, None).is_err());
    assert!(
        torchserve_prediction(
            &json!({"0": 0.9, "1": 0.9}),
            OutputKind::Probabilities,
            None
        )
        .is_err()
    );
}

#[test]
fn error_bodies_of_every_shape_give_their_message() {
    assert_eq!(
        error_message(br#"{"error": "Model nope not found"}"#),
        "Model nope not found"
    );
    assert_eq!(error_message(br#"{"code": 404, "type": "ModelNotFoundException", "message": "Model not found: nope"}"#), "Model not found: nope");
    assert_eq!(
        error_message(br#"{"detail":[{"type":"missing","msg":"Field required"}]}"#),
        "Field required"
    );
    assert_eq!(
        error_message(b"Internal Server Error"),
        "Internal Server Error"
    );
    assert_eq!(error_message(b""), "(empty body)");
}
