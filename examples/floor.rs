//! The **floor** for verdict's benchmark (`benches/run.sh`, issue #6): the least a
//! service must do to answer the same decision request with the same one API call.
//!
//! `POST /v1/decisions` parses the same request JSON as verdict (SPEC §3), makes the
//! same call as the benchmark rule (`benches/floor/bench-policies.json.template`: `POST
//! {UPSTREAM}/v1/devices/{device_id}/check?user={username}` with the JSON body
//! `{"user", "ip", "groups"}`, path segment and query value percent-encoded), through
//! one pooled reqwest client configured like verdict's (rustls, TCP_NODELAY, keep-alive,
//! no redirects), within the rule's timeout, parses the JSON answer, compares
//! `$.status == "compliant"` and replies `{"decision":"allow"}` (or `deny`). Nothing
//! else: no authentication, no logging, no activity log, no durability.
//!
//! `POST /v1/decisions-nocall` (or every `POST /v1/decisions` when `FLOOR_NO_CALL=1`)
//! parses the request and replies `{"decision":"allow"}` without the call: the
//! "no-call floor" that verdict's cache hits are compared with.
//!
//! Usage: `floor LISTEN_ADDR UPSTREAM_BASE_URL`, e.g.
//! `cargo run --release --example floor -- 127.0.0.1:9090 http://127.0.0.1:9091`.
//! Workers: actix's default (one per core), as verdict.

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;

/// What is left unescaped in a path segment or query value (RFC 3986 unreserved).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The benchmark rule's timeout.
const TIMEOUT: Duration = Duration::from_millis(2000);

const ALLOW: &str = r#"{"decision":"allow"}"#;
const DENY: &str = r#"{"decision":"deny"}"#;

/// The decision request (SPEC §3); every field parsed, as verdict does.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Context {
    application: String,
    username: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    group_names: Vec<String>,
    remote_ip: Option<String>,
    internal_addr: Option<String>,
    user_agent: Option<String>,
    device_id: Option<String>,
    client_certificate: Option<String>,
    #[serde(default)]
    headers: serde_json::Map<String, serde_json::Value>,
}

struct Floor {
    client: reqwest::Client,
    upstream: String,
    no_call: bool,
}

fn answer(allow: bool) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(if allow { ALLOW } else { DENY })
}

fn parse(body: &[u8]) -> Result<Context, serde_json::Error> {
    serde_json::from_slice(body)
}

fn bad_request(e: serde_json::Error) -> HttpResponse {
    HttpResponse::BadRequest().body(e.to_string())
}

async fn decide(body: web::Bytes, floor: web::Data<Floor>) -> HttpResponse {
    let ctx = match parse(&body) {
        Ok(ctx) => ctx,
        Err(e) => return bad_request(e),
    };
    if floor.no_call {
        return answer(true);
    }
    // A missing parameter makes the rule deny without a call, as in verdict.
    let (Some(device), Some(user), Some(ip)) = (&ctx.device_id, &ctx.username, &ctx.remote_ip) else {
        return answer(false);
    };
    let url = format!(
        "{}/v1/devices/{}/check?user={}",
        floor.upstream,
        utf8_percent_encode(device, COMPONENT),
        utf8_percent_encode(user, COMPONENT)
    );
    let payload = serde_json::json!({"user": user, "ip": ip, "groups": ctx.groups});
    let request = floor
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&payload).unwrap_or_default());
    let call = async {
        let resp = request.send().await.ok()?;
        if !resp.status().is_success() {
            return Some(false);
        }
        let bytes = resp.bytes().await.ok()?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        Some(json.get("status").and_then(|s| s.as_str()) == Some("compliant"))
    };
    // Timeouts and errors deny (`on_error: deny`).
    answer(matches!(tokio::time::timeout(TIMEOUT, call).await, Ok(Some(true))))
}

async fn decide_nocall(body: web::Bytes) -> HttpResponse {
    match parse(&body) {
        Ok(_) => answer(true),
        Err(e) => bad_request(e),
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: floor LISTEN_ADDR UPSTREAM_BASE_URL   (FLOOR_NO_CALL=1: never call)");
        std::process::exit(2);
    };
    let no_call = std::env::var("FLOOR_NO_CALL").is_ok_and(|v| v == "1");
    actix_web::rt::System::new().block_on(async move {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("verdict/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(std::io::Error::other)?;
        let floor = web::Data::new(Floor { client, upstream: upstream.trim_end_matches('/').to_owned(), no_call });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(floor.clone())
                .route("/v1/decisions", web::post().to(decide))
                .route("/v1/decisions-nocall", web::post().to(decide_nocall))
        })
        .bind(&listen)?;
        eprintln!("floor: listening on {listen}, upstream {upstream}, no_call={no_call}");
        server.run().await
    })
}
