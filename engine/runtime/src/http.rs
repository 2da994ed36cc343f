//! Bounded reads of HTTP responses from servers we call (backend FHIR servers, JWKS and
//! introspection endpoints, a partner's token endpoint and FHIR server).
//!
//! `reqwest`'s `bytes()`, `text()` and `json()` read a body whatever its length; a server that
//! streams without end, or announces gigabytes, would hold a request and its memory until the
//! timeout. Every response body we read goes through [`read_limited`] instead.

use bytes::{Bytes, BytesMut};

/// Why a response body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body (as announced by `Content-Length`, or as it arrived) exceeds the limit. Nothing
    /// more is read once the limit is passed.
    #[error("response body larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The connection failed or timed out while the body was arriving.
    #[error("response body not received: {0}")]
    Failed(#[source] reqwest::Error),
}

impl BodyError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, BodyError::Failed(e) if e.is_timeout())
    }
}

/// Reads `res`'s body, refusing it as soon as it is known to exceed `limit` bytes.
pub async fn read_limited(mut res: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    let announced = res.content_length();
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut buf = BytesMut::with_capacity(announced.map_or(0, |n| n as usize));
    while let Some(chunk) = res.chunk().await.map_err(BodyError::Failed)? {
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// [`read_limited`], then parsed as JSON (`None` when it is not JSON).
pub async fn read_json_limited(
    res: reqwest::Response,
    limit: usize,
) -> Result<Option<serde_json::Value>, BodyError> {
    let bytes = read_limited(res, limit).await?;
    Ok(serde_json::from_slice(&bytes).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real HTTP/1.1 server on loopback that answers every request with `head` and then the
    /// chunks `chunk` repeated `count` times (`count = None`: until the client goes away).
    async fn server(head: &'static str, chunk: Vec<u8>, count: Option<usize>) -> String {
        let chunk = std::sync::Arc::new(chunk);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let chunk = chunk.clone();
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = s.read(&mut req).await;
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut sent = 0;
                    while count.is_none_or(|c| sent < c) {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                        sent += 1;
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        format!("http://{addr}/")
    }

    const CHUNKED: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    /// One chunk of 1,024 bytes.
    fn kib() -> Vec<u8> {
        format!("400\r\n{}\r\n", "x".repeat(1024)).into_bytes()
    }

    async fn get(url: &str) -> reqwest::Response {
        reqwest::get(url).await.unwrap()
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let url = server(CHUNKED, kib(), Some(8)).await;
        let body = read_limited(get(&url).await, 8 * 1024).await.unwrap();
        assert_eq!(body.len(), 8 * 1024);
    }

    #[tokio::test]
    async fn a_chunked_body_without_end_is_refused_at_the_limit() {
        let url = server(CHUNKED, kib(), None).await;
        let started = std::time::Instant::now();
        let err = read_limited(get(&url).await, 64 * 1024).await.unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { limit: 65536 }), "{err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "refused while the server was still sending"
        );
        let url = server(CHUNKED, kib(), Some(9)).await;
        let err = read_limited(get(&url).await, 8 * 1024).await.unwrap_err();
        assert!(
            matches!(err, BodyError::TooLarge { .. }),
            "1 KiB over is refused"
        );
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_before_reading() {
        // The server announces 1 GiB and sends nothing: only the header can refuse it.
        let url = server(
            "HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n",
            Vec::new(),
            Some(0),
        )
        .await;
        let err = read_limited(get(&url).await, 1 << 20).await.unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn json_is_parsed_and_anything_else_is_none() {
        let url = server(
            "HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"a\": true}",
            Vec::new(),
            Some(0),
        )
        .await;
        let v = read_json_limited(get(&url).await, 1024).await.unwrap();
        assert_eq!(v, Some(serde_json::json!({"a": true})));
        let url = server(CHUNKED, kib(), Some(1)).await;
        assert_eq!(
            read_json_limited(get(&url).await, 4096).await.unwrap(),
            None
        );
    }
}
