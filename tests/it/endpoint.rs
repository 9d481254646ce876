//! Faults a real server cannot be made to produce on demand, against wiremock: retries on 5xx,
//! 429 and dropped connections, none on other 4xx, timeouts, garbage and invalid bodies, and
//! each protocol's request and response shapes.

use hallmark::dataset::ImageShape;
use hallmark::endpoint::{
    EndpointConfig, EndpointError, HttpEndpoint, ModelEndpoint, OutputKind, Prediction, Protocol,
    TensorLayout,
};
use serde_json::json;
use std::time::Duration;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SHAPE: ImageShape = ImageShape {
    height: 2,
    width: 2,
    channels: 1,
};

fn images(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| vec![i as u8; 4]).collect()
}

fn cfg(server: &MockServer, protocol: Protocol) -> EndpointConfig {
    let mut c = EndpointConfig::new(server.uri(), protocol, "m");
    c.allow_private = true;
    c.retries = 2;
    c.timeout = Duration::from_millis(500);
    c.layout = Some(TensorLayout::Flat);
    c.input_name = Some("image".into());
    c
}

fn v2_probs(n: usize) -> serde_json::Value {
    json!({"model_name": "m", "outputs": [{"name": "predict_proba", "shape": [n, 2], "datatype": "FP64",
           "data": (0..n).flat_map(|_| [0.25, 0.75]).collect::<Vec<_>>()}]})
}

async fn metadata_404(server: &MockServer) {
    // No metadata: the configured defaults are used.
    Mock::given(method("GET"))
        .and(path("/v2/models/m"))
        .respond_with(ResponseTemplate::new(500))
        .mount(server)
        .await;
}

#[tokio::test]
async fn server_errors_are_retried_and_then_succeed() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .and(path("/v2/models/m/infer"))
        .respond_with(ResponseTemplate::new(503).set_body_string("overloaded"))
        .up_to_n_times(2)
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v2/models/m/infer"))
        .respond_with(ResponseTemplate::new(200).set_body_json(v2_probs(3)))
        .expect(1)
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    let p = ep.predict(&images(3), SHAPE).await.unwrap();
    assert_eq!(p[2], Prediction::Probs(vec![0.25, 0.75]));
}

/// Answers 429 with `Retry-After: 2` the first time and the probabilities after, noting when
/// each request arrived.
struct RateLimited(std::sync::Mutex<Vec<std::time::Instant>>);

impl wiremock::Respond for RateLimited {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let mut seen = self.0.lock().unwrap();
        seen.push(std::time::Instant::now());
        if seen.len() == 1 {
            ResponseTemplate::new(429).insert_header("retry-after", "2")
        } else {
            ResponseTemplate::new(200).set_body_json(v2_probs(1))
        }
    }
}

/// The retry after a 429 waits the seconds the server asked for: without the header the first
/// back-off is 50-100 ms, so a client that ignored it would be back within a fraction of the two
/// seconds. (Measured by the server's clock: paused tokio time would also jump the client's own
/// request timeout while the real socket is waiting.)
#[tokio::test]
async fn rate_limits_are_retried_after_the_server_says() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    let arrivals = std::sync::Arc::new(RateLimited(Default::default()));
    Mock::given(method("POST"))
        .respond_with(SharedResponder(arrivals.clone()))
        .expect(2)
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    assert!(ep.predict(&images(1), SHAPE).await.is_ok());
    let seen = arrivals.0.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let waited = seen[1] - seen[0];
    assert!(
        waited >= Duration::from_secs(2),
        "retried after {waited:?}, not the 2 s the server asked for"
    );
}

/// A responder shared with the test, which reads what it saw.
struct SharedResponder(std::sync::Arc<RateLimited>);

impl wiremock::Respond for SharedResponder {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        self.0.respond(request)
    }
}

#[tokio::test]
async fn client_errors_are_never_retried() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(422)
                .set_body_json(json!({"detail": [{"type": "missing", "msg": "Field required"}]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    let e = ep.predict(&images(1), SHAPE).await.unwrap_err();
    assert!(
        matches!(&e, EndpointError::Status { status: 422, message, .. } if message == "Field required"),
        "{e}"
    );
}

#[tokio::test]
async fn persistent_plain_text_500s_fail_after_the_retries() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("Internal Server Error"))
        .expect(3)
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    let e = ep.predict(&images(1), SHAPE).await.unwrap_err().to_string();
    assert!(
        e.contains("500") && e.contains("Internal Server Error") && e.contains("after 3 attempts"),
        "{e}"
    );
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(v2_probs(1))
                .set_delay(Duration::from_secs(2)),
        )
        .expect(3)
        .mount(&server)
        .await;
    let mut c = cfg(&server, Protocol::V2);
    c.timeout = Duration::from_millis(150);
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    let e = ep.predict(&images(1), SHAPE).await.unwrap_err().to_string();
    assert!(e.contains("timed out"), "{e}");
}

#[tokio::test]
async fn a_closed_port_is_a_transport_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = EndpointConfig::new(format!("http://127.0.0.1:{port}"), Protocol::KserveV1, "m");
    c.allow_private = true;
    c.retries = 1;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    let e = ep.predict(&images(1), SHAPE).await.unwrap_err();
    assert!(matches!(e, EndpointError::Transport { .. }), "{e}");
}

#[tokio::test]
async fn garbage_and_invalid_probabilities_are_errors() {
    for body in [ResponseTemplate::new(200).set_body_string("<html>oops</html>"),
                 ResponseTemplate::new(200).set_body_json(json!({"outputs": [{"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0.9, 0.9]}]})),
                 ResponseTemplate::new(200).set_body_json(json!({"outputs": [{"name": "p", "shape": [2, 2], "datatype": "FP32", "data": [0.5, 0.5, 0.5, 0.5]}]}))] {
        let server = MockServer::start().await;
        metadata_404(&server).await;
        Mock::given(method("POST")).respond_with(body).expect(1).mount(&server).await;
        let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1).await.unwrap();
        let e = ep.predict(&images(1), SHAPE).await.unwrap_err();
        assert!(matches!(e, EndpointError::Invalid { .. }), "{e}");
    }
}

#[tokio::test]
async fn v2_metadata_fills_in_input_layout_and_output() {
    let server = MockServer::start().await;
    Mock::given(method("GET")).and(path("/v2/models/m")).respond_with(ResponseTemplate::new(200).set_body_json(json!({
        "name": "m", "versions": null, "platform": "",
        "inputs": [{"name": "pixels", "datatype": "FP64", "shape": [-1, 1, 2, 2]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1, 1]}, {"name": "probs", "datatype": "FP32", "shape": [-1, 2]}]})))
        .mount(&server).await;
    Mock::given(method("POST")).and(path("/v2/models/m/infer"))
        .and(body_partial_json(json!({"inputs": [{"name": "pixels", "datatype": "FP64", "shape": [1, 1, 2, 2]}], "outputs": [{"name": "probs"}]})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"outputs": [{"name": "probs", "shape": [1, 2], "datatype": "FP32", "data": [0.1, 0.9]}]})))
        .expect(1).mount(&server).await;
    let mut c = EndpointConfig::new(server.uri(), Protocol::V2, "m");
    c.allow_private = true;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    assert_eq!(
        ep.predict(&images(1), SHAPE).await.unwrap()[0].label(),
        Some(1)
    );
    let eff = ep.effective_config();
    assert_eq!(
        (eff.input_name.as_deref(), eff.layout),
        (Some("pixels"), Some(TensorLayout::Nchw))
    );
}

#[tokio::test]
async fn an_unknown_v2_model_is_reported_at_connect() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(404)
                .insert_header("content-type", "text/plain")
                .set_body_string(r#"{"error":"Request for unknown model: 'm' is not found"}"#),
        )
        .mount(&server)
        .await;
    let e = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") && e.contains("unknown model"), "{e}");
}

#[tokio::test]
async fn tf_serving_and_kserve_v1_use_instances_and_predictions() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/models/m:predict"))
        .and(body_partial_json(
            json!({"instances": [{"image": [0.0, 0.0, 0.0, 0.0]}]}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(r#"{"predictions": [[0.3, 0.7], [NaN, 1.0]]}"#),
        )
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::Tfserving), 1)
        .await
        .unwrap();
    let e = ep.predict(&images(2), SHAPE).await.unwrap_err().to_string();
    assert!(e.contains("non-finite"), "{e}");
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/models/m:predict"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"predictions": [1, 0]})))
        .mount(&server)
        .await;
    let mut c = cfg(&server, Protocol::KserveV1);
    c.output = OutputKind::Labels;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    assert_eq!(
        ep.predict(&images(2), SHAPE).await.unwrap(),
        vec![Prediction::Label(1), Prediction::Label(0)]
    );
}

#[tokio::test]
async fn torchserve_gets_png_bodies_and_answers_top_k() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/predictions/m"))
        .and(header("content-type", "application/octet-stream"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"3": 0.8, "1": 0.15, "0": 0.05})),
        )
        .expect(2)
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::Torchserve), 1)
        .await
        .unwrap();
    let p = ep.predict(&images(2), SHAPE).await.unwrap();
    assert_eq!(p[0].label(), Some(3));
    assert_eq!(p[0].prob_bounds(7), Some((0.0, 0.05)));
    let req = &server.received_requests().await.unwrap()[0];
    assert!(req.body.starts_with(b"\x89PNG"), "the body is a PNG image");
}

#[tokio::test]
async fn json_templates_put_the_batch_where_asked() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/score"))
        .and(body_partial_json(
            json!({"model": "x", "data": {"rows": [[0.0, 0.0, 0.0, 0.0]]}}),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"result": {"scores": [[0.6, 0.4]]}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let mut c = cfg(&server, Protocol::Json);
    c.url = format!("{}/score", server.uri());
    c.input_name = None;
    c.template = Some(r#"{"model": "x", "data": {"rows": "$INSTANCES"}}"#.into());
    c.output_pointer = Some("/result/scores".into());
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    assert_eq!(
        ep.predict(&images(1), SHAPE).await.unwrap()[0].label(),
        Some(0)
    );
}

#[tokio::test]
async fn requests_are_batched_with_order_kept() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(v2_probs(2)))
        .expect(3)
        .mount(&server)
        .await;
    let mut c = cfg(&server, Protocol::V2);
    c.batch_size = 2;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    // 5 images in batches of 2, 2, 1: the last batch gets 2 answers and is refused.
    let e = ep.predict(&images(5), SHAPE).await.unwrap_err().to_string();
    assert!(e.contains("batch size 1"), "{e}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(307).insert_header("location", "http://169.254.169.254/latest"),
        )
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    let e = ep.predict(&images(1), SHAPE).await.unwrap_err();
    assert!(
        matches!(e, EndpointError::Status { status: 307, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn readiness_is_read_from_the_status_code_whatever_the_body() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("GET"))
        .and(path("/v2/models/m/ready"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/models/m"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"name": "m", "ready": true})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/ping"))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({"status": "Unhealthy"})))
        .mount(&server)
        .await;
    assert!(
        HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
            .await
            .unwrap()
            .ready()
            .await
            .unwrap()
    );
    assert!(
        HttpEndpoint::connect(cfg(&server, Protocol::KserveV1), 1)
            .await
            .unwrap()
            .ready()
            .await
            .unwrap()
    );
    assert!(
        !HttpEndpoint::connect(cfg(&server, Protocol::Torchserve), 1)
            .await
            .unwrap()
            .ready()
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn one_dimensional_label_outputs_are_accepted() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)
        .set_body_json(json!({"id": null, "outputs": [{"name": "label", "shape": [2], "datatype": "INT32", "data": [3, 1]}]})))
        .mount(&server).await;
    let mut c = cfg(&server, Protocol::V2);
    c.output = OutputKind::Labels;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    assert_eq!(
        ep.predict(&images(2), SHAPE).await.unwrap(),
        vec![Prediction::Label(3), Prediction::Label(1)]
    );
}

/// An output named `logits` is read as logits even where its values could pass for
/// probabilities, and the description (the report's `endpoint`) says so and why.
#[tokio::test]
async fn logits_are_inferred_from_the_output_name_and_reported() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v2/models/m"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
        "name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v2/models/m/infer"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"outputs": [
            {"name": "logits", "shape": [1, 2], "datatype": "FP32", "data": [0.0, 0.9]}]})))
        .mount(&server)
        .await;
    let mut c = EndpointConfig::new(server.uri(), Protocol::V2, "m");
    c.allow_private = true;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    let Prediction::Probs(p) = &ep.predict(&images(1), SHAPE).await.unwrap()[0] else {
        panic!("scores expected")
    };
    let want = 1.0 / (1.0 + 0.9f64.exp());
    assert!((p[0] - want).abs() < 1e-9, "softmax of the logits: {p:?}");
    let d = ep.describe();
    assert!(
        d.contains("\"logits\" read as logits") && d.contains("named \"logits\""),
        "{d}"
    );
}

/// Without a telling name, scores outside [0, 1] settle the output as logits for the whole
/// run (a later batch that could pass for probabilities is still read as logits); scores
/// inside [0, 1] that do not sum to 1 stay an error.
#[tokio::test]
async fn logits_are_inferred_from_values_once_per_run() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    let answer = |data: [f64; 2]| {
        ResponseTemplate::new(200).set_body_json(
            json!({"outputs": [{"name": "out", "shape": [1, 2], "datatype": "FP32", "data": data}]}),
        )
    };
    Mock::given(method("POST"))
        .respond_with(answer([-0.26, 1.5]))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(answer([0.25, 0.75]))
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    ep.predict(&images(1), SHAPE).await.unwrap();
    let Prediction::Probs(p) = &ep.predict(&images(1), SHAPE).await.unwrap()[0] else {
        panic!("scores expected")
    };
    assert!((p[1] - 1.0 / (1.0 + (-0.5f64).exp())).abs() < 1e-9, "{p:?}");
    assert!(
        ep.describe().contains("outside [0, 1]"),
        "{}",
        ep.describe()
    );
    // Inside [0, 1] but summing to 1.8: not silently taken for logits.
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .respond_with(answer([0.9, 0.9]))
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    let e = ep.predict(&images(1), SHAPE).await.unwrap_err().to_string();
    assert!(e.contains("sum to 1.8"), "{e}");
}

/// Label-only verification of a model that gives only scores takes their arg-max, whether the
/// output is found from the metadata or named (a score output named with --output-name is no
/// longer read as a class index), and says so.
#[tokio::test]
async fn labels_are_the_arg_max_of_a_score_output() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v2/models/m"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
        "name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v2/models/m/infer"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"outputs": [
            {"name": "logits", "shape": [2, 3], "datatype": "FP32", "data": [-0.04, 2.0, 1.0, 3.0, -1.0, 0.5]}]})))
        .mount(&server)
        .await;
    for named in [None, Some("logits")] {
        let mut c = EndpointConfig::new(server.uri(), Protocol::V2, "m");
        c.allow_private = true;
        c.output = OutputKind::Labels;
        c.output_name = named.map(str::to_string);
        let ep = HttpEndpoint::connect(c, 1).await.unwrap();
        let p = ep.predict(&images(2), SHAPE).await.unwrap();
        assert_eq!(p, vec![Prediction::Label(1), Prediction::Label(0)]);
        assert!(
            ep.describe().contains("arg-max of output \"logits\""),
            "{}",
            ep.describe()
        );
    }
}

/// A server that is still starting (nothing listens yet) is waited for up to the timeout, with
/// the metadata request retried, instead of failing at once.
#[tokio::test]
async fn the_first_contact_waits_for_a_server_that_is_starting() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let starting = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let server = MockServer::builder()
            .listener(std::net::TcpListener::bind(addr).unwrap())
            .start()
            .await;
        Mock::given(method("GET"))
            .and(path("/v2/models/m"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "name": "m", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]}]})))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(body_partial_json(json!({"inputs": [{"name": "pixels"}]})))
            .respond_with(ResponseTemplate::new(200).set_body_json(v2_probs(1)))
            .mount(&server)
            .await;
        server
    });
    let mut c = EndpointConfig::new(format!("http://{addr}"), Protocol::V2, "m");
    c.allow_private = true;
    c.timeout = Duration::from_secs(10);
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    let _server = starting.await.unwrap();
    assert_eq!(ep.effective_config().input_name.as_deref(), Some("pixels"));
    ep.predict(&images(1), SHAPE).await.unwrap();
    // A server that never starts fails once the timeout has passed, and says how long it waited.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = EndpointConfig::new(format!("http://{closed}"), Protocol::V2, "m");
    c.allow_private = true;
    c.retries = 0;
    c.timeout = Duration::from_secs(2);
    let e = HttpEndpoint::connect(c, 1).await.unwrap_err().to_string();
    assert!(
        e.contains("for the server to start") && e.contains("after 1 attempt)"),
        "{e}"
    );
}

/// A 404 on one protocol's path says which protocol the server does answer, or that the model
/// is missing from a server that speaks the protocol.
#[tokio::test]
async fn a_404_names_the_protocol_the_server_speaks() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"name": "triton"})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v2/models/m"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"error": "unknown model"})))
        .mount(&server)
        .await;
    for protocol in [Protocol::KserveV1, Protocol::Torchserve] {
        let ep = HttpEndpoint::connect(cfg(&server, protocol), 1)
            .await
            .unwrap();
        let e = ep.predict(&images(1), SHAPE).await.unwrap_err().to_string();
        assert!(e.contains("404") && e.contains("--protocol v2"), "{e}");
    }
    let e = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no model \"m\""), "{e}");
}

/// The batch size follows the server's published limit (Triton's `max_batch_size` at
/// `/v2/models/NAME/config`), and a batch refused with a 400 that names the batch size is
/// split in halves, later batches made no larger; the description says why.
#[tokio::test]
async fn batches_follow_the_servers_limit() {
    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("GET"))
        .and(path("/v2/models/m/config"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"name": "m", "max_batch_size": 2})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"inputs": [{"shape": [2, 4]}]})))
        .respond_with(ResponseTemplate::new(200).set_body_json(v2_probs(2)))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"inputs": [{"shape": [1, 4]}]})))
        .respond_with(ResponseTemplate::new(200).set_body_json(v2_probs(1)))
        .expect(1)
        .mount(&server)
        .await;
    let ep = HttpEndpoint::connect(cfg(&server, Protocol::V2), 1)
        .await
        .unwrap();
    assert_eq!(ep.predict(&images(5), SHAPE).await.unwrap().len(), 5);
    assert!(
        ep.describe().contains("max_batch_size"),
        "{}",
        ep.describe()
    );

    let server = MockServer::start().await;
    metadata_404(&server).await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"inputs": [{"shape": [4, 4]}]})))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(
                json!({"error": "inference request batch-size must be <= 2 for 'm'"}),
            ),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"inputs": [{"shape": [2, 4]}]})))
        .respond_with(ResponseTemplate::new(200).set_body_json(v2_probs(2)))
        .expect(4)
        .mount(&server)
        .await;
    let mut c = cfg(&server, Protocol::V2);
    c.batch_size = 4;
    let ep = HttpEndpoint::connect(c, 1).await.unwrap();
    assert_eq!(ep.predict(&images(4), SHAPE).await.unwrap().len(), 4);
    // The next call starts at the halved size: no second refusal.
    assert_eq!(ep.predict(&images(4), SHAPE).await.unwrap().len(), 4);
    assert!(ep.describe().contains("halved to 2"), "{}", ep.describe());
}

/// A server that answers every request with status 200 and a body that never ends: with
/// `length`, announced in Content-Length; without, streamed in chunks. Returns its URL.
pub async fn endless_server(length: Option<u64>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                let _ = sock.read(&mut buf).await;
                let head = match length {
                    Some(n) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n"
                    ),
                    None => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".into(),
                };
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![b' '; 1 << 16];
                let chunk = [
                    format!("{:x}\r\n", block.len()).into_bytes(),
                    block.clone(),
                    b"\r\n".to_vec(),
                ]
                .concat();
                loop {
                    let out = if length.is_some() { &block } else { &chunk };
                    if sock.write_all(out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// A model server whose answer never ends (or announces 3 GB) is cut off at the size an answer
/// to the batch can need, with a clear error, instead of filling the verifier's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_cut_off() {
    for length in [None, Some(3_000_000_000u64)] {
        let mut c = EndpointConfig::new(endless_server(length).await, Protocol::V2, "m");
        c.allow_private = true;
        c.retries = 0;
        c.timeout = Duration::from_secs(60);
        c.layout = Some(TensorLayout::Flat);
        c.input_name = Some("image".into());
        c.output = OutputKind::Probabilities;
        let e = match HttpEndpoint::connect(c, 1).await {
            Ok(ep) => ep.predict(&images(2), SHAPE).await.unwrap_err(),
            Err(e) => e,
        };
        assert!(e.to_string().contains("larger than"), "{length:?}: {e}");
    }
}
