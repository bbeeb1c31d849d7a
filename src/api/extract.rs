//! Request plumbing shared by handlers: the caller behind a bearer token, and bodies
//! read with a size limit and parsed with the path of the field that is wrong.

use actix_web::{web, HttpRequest};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::tokens::{Caller, Role};

/// The caller, if the token is known.
pub fn caller(req: &HttpRequest, state: &AppState) -> Result<Caller, ApiError> {
    let header =
        req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let token =
        header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).map(str::trim).unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::unauthenticated());
    }
    state.tokens.identify(token).ok_or_else(ApiError::unauthenticated)
}

/// The caller, who must hold one of `roles`.
pub fn require(req: &HttpRequest, state: &AppState, roles: &[Role]) -> Result<Caller, ApiError> {
    let caller = caller(req, state)?;
    if roles.contains(&caller.role) {
        Ok(caller)
    } else {
        let needed: Vec<String> = roles.iter().map(|r| format!("`{}`", r.as_str())).collect();
        Err(ApiError::forbidden(caller.role.as_str(), &needed.join(" or ")))
    }
}

/// Reads a body up to the configured limit (413 beyond it).
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => ApiError::too_large(limit),
            _ => ApiError::malformed("the request body could not be read"),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parses JSON; a syntax error is a 400, a wrong field type a 400 naming the field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Most bodies are fine: parse them without tracking paths, and parse again with
    // tracking only to describe a failure (the result is the same, the cost is not).
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::malformed(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::malformed(format!("unexpected body: {inner}"))
        } else {
            ApiError::bad_field(&path, format!("`{path}`: {inner}"))
        }
    })?;
    de.end().map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}
