//! The example service end to end, in-process: HTTP requests through its
//! router while the supervisor keeps the projection current; a second
//! start on the same data serves what the first wrote.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use projectionist_example_service::App;
use serde_json::{Value, json};
use tower::ServiceExt;

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_order_is_read_back_at_once_and_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let app = App::start(tmp.path()).unwrap();
    let router = app.router();
    for cents in [250, 100] {
        let (status, body) = call(
            &router,
            "POST",
            "/orders",
            Some(json!({"order": "o-1", "cents": cents})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Read-your-writes: the answer to the POST already counts the order.
    let (status, body) = call(
        &router,
        "POST",
        "/orders",
        Some(json!({"order": "o-1", "cents": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cents"], 355);
    assert_eq!(body["placed"], 3);
    let (status, body) = call(&router, "GET", "/orders/o-1", None).await;
    assert_eq!(
        (status, body["cents"].clone()),
        (StatusCode::OK, json!(355))
    );
    let (status, _) = call(&router, "GET", "/orders/o-2", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call(
        &router,
        "POST",
        "/orders",
        Some(json!({"order": "", "cents": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(&router, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(&router, "GET", "/status", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body[0]["projection"], "order_totals");
    assert_eq!(body[0]["checkpoint"], 3);
    drop(router);
    // The supervisor stops (committing) when the app goes; a new start on
    // the same data resumes from the checkpoint.
    tokio::task::spawn_blocking(move || drop(app))
        .await
        .unwrap();
    let again = App::start(tmp.path()).unwrap();
    let router = again.router();
    let (status, body) = call(
        &router,
        "POST",
        "/orders",
        Some(json!({"order": "o-1", "cents": 45})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cents"], 400);
    assert_eq!(body["placed"], 4);
    drop(router);
    tokio::task::spawn_blocking(move || drop(again))
        .await
        .unwrap();
}
