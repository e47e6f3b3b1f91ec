//! Fetching one URL: per-host concurrency and request rate, timeouts, redirects followed by hand (each hop
//! counts against its own host), a body size limit enforced while streaming, `X-Robots-Tag` opt-outs, and
//! retries with exponential backoff and jitter for the failures that may pass (timeouts, connection errors,
//! truncated bodies, 429 with `Retry-After`, 5xx).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imglish_ingest::Rng;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// How URLs are fetched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchConfig {
    /// Requests in flight at once, over all hosts.
    pub concurrency: usize,
    /// Requests in flight at once to one host (`host:port`).
    pub per_host: usize,
    /// Requests per second started to one host (0: no limit).
    pub per_host_rate: f64,
    /// Time to open a connection.
    pub connect_timeout: Duration,
    /// Time for one request, from sending it to the last byte of the body.
    pub timeout: Duration,
    /// Largest body accepted, in bytes (checked against `Content-Length` and while reading).
    pub max_bytes: u64,
    /// Redirects followed per request; a longer chain is `too-many-redirects`, a cycle `redirect-loop`.
    pub max_redirects: u32,
    /// Further attempts after a retryable failure.
    pub retries: u32,
    /// Backoff before the first retry; doubled each time, with jitter (x0.5 to x1.0), up to `max_backoff`.
    pub backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Longest `Retry-After` waited for; a server asking for more gets the row failed as `http-429`.
    pub max_retry_after: Duration,
    /// Skip images whose response carries `X-Robots-Tag: noai`, `noimageai`, `noindex` or `noimageindex`
    /// (for all agents or for `imglish`), as img2dataset does by default.
    pub honour_opt_out: bool,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            concurrency: 64,
            per_host: 8,
            per_host_rate: 0.0,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            max_bytes: 32 << 20,
            max_redirects: 5,
            retries: 2,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            honour_opt_out: true,
            user_agent: user_agent(None),
        }
    }
}

/// The token sites name in `X-Robots-Tag: imglish: noai`.
pub const USER_AGENT_TOKEN: &str = "imglish";

/// `imglish/VERSION (+https://example.invalid/imglish[; CONTACT])`.
pub fn user_agent(contact: Option<&str>) -> String {
    let mut ua = format!(
        "{USER_AGENT_TOKEN}/{} (+https://example.invalid/imglish; image-text dataset downloader",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(c) = contact.filter(|c| !c.trim().is_empty()) {
        ua.push_str("; contact: ");
        ua.push_str(c.trim());
    }
    ua.push(')');
    ua
}

const OPT_OUT_DIRECTIVES: [&str; 4] = ["noai", "noimageai", "noindex", "noimageindex"];

/// Whether the response's `X-Robots-Tag` headers opt out of use by this agent: a directive list either for
/// every agent (`noai`) or for ours (`imglish: noai`); another agent's (`otherbot: noai`) does not apply.
pub fn opted_out(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all("x-robots-tag") {
        let Ok(text) = value.to_str() else { continue };
        let (agent, list) = match text.split_once(':') {
            Some((a, l)) if !a.contains(',') => (Some(a.trim().to_ascii_lowercase()), l),
            _ => (None, text),
        };
        if agent.as_deref().is_some_and(|a| a != USER_AGENT_TOKEN && a != "*") {
            continue;
        }
        for d in list.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            if OPT_OUT_DIRECTIVES.contains(&d.as_str()) {
                return Some(format!("X-Robots-Tag: {}", text.trim()));
            }
        }
    }
    None
}

/// A fetched body.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub bytes: Vec<u8>,
    pub http_status: u16,
    pub final_url: String,
    pub content_type: Option<String>,
}

/// Why a fetch failed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// The reason code (`http-404`, `timeout`, ...).
    pub reason: String,
    pub http_status: Option<u16>,
    pub message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Failure {
            reason: reason.into(),
            http_status: None,
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }

    fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    fn status(mut self, code: u16) -> Self {
        self.http_status = Some(code);
        self
    }
}

/// A fetch's end: the body or the last failure, and how many attempts it took.
pub(crate) struct Attempted {
    pub result: std::result::Result<Fetched, Failure>,
    pub attempts: u32,
}

struct Host {
    permits: Semaphore,
    next_start: tokio::sync::Mutex<Instant>,
}

/// Fetches URLs under one configuration; shared by every task of a run.
pub(crate) struct Fetcher {
    client: Client,
    config: FetchConfig,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    seed: u64,
}

impl Fetcher {
    pub fn new(config: FetchConfig, seed: u64) -> Result<Self> {
        let client = Client::builder()
            .user_agent(config.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.per_host)
            .build()
            .map_err(|e| Error::Client(e.to_string()))?;
        Ok(Fetcher {
            client,
            config,
            hosts: Mutex::new(HashMap::new()),
            seed,
        })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    fn host(&self, url: &Url) -> Arc<Host> {
        let key = format!(
            "{}:{}",
            url.host_str().unwrap_or(""),
            url.port_or_known_default().unwrap_or(0)
        );
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Host {
                    permits: Semaphore::new(self.config.per_host.max(1)),
                    next_start: tokio::sync::Mutex::new(Instant::now()),
                })
            })
            .clone()
    }

    /// Fetches `url` with retries; `index` keys the backoff jitter so a rerun waits the same.
    pub async fn fetch(&self, url: &str, index: u64) -> Attempted {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let result = self.attempt(url).await;
            match result {
                Err(f) if f.retryable && attempts <= self.config.retries => {
                    let wait = match f.retry_after {
                        Some(ra) if ra > self.config.max_retry_after => {
                            let mut f = f;
                            f.message = format!(
                                "{}; the server asks to wait {}s, more than --max-retry-after",
                                f.message,
                                ra.as_secs()
                            );
                            return Attempted {
                                result: Err(f),
                                attempts,
                            };
                        }
                        Some(ra) => ra,
                        None => self.backoff(index, attempts),
                    };
                    tokio::time::sleep(wait).await;
                }
                result => return Attempted { result, attempts },
            }
        }
    }

    fn backoff(&self, index: u64, attempt: u32) -> Duration {
        let base = self.config.backoff.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        let jitter = Rng::keyed(&[self.seed, 0xBAC0, index, u64::from(attempt)]).uniform(0.5, 1.0);
        Duration::from_secs_f64((base * jitter).min(self.config.max_backoff.as_secs_f64()))
    }

    /// One attempt: the request and every redirect hop.
    async fn attempt(&self, url: &str) -> std::result::Result<Fetched, Failure> {
        let mut current = Url::parse(url).map_err(|e| Failure::new("bad-url", format!("{url}: {e}")))?;
        let mut seen = HashSet::new();
        seen.insert(current.to_string());
        for _ in 0..=self.config.max_redirects {
            if !matches!(current.scheme(), "http" | "https") {
                return Err(Failure::new("bad-url", format!("{current}: not an http(s) URL")));
            }
            match self.hop(&current).await? {
                Hop::Done(f) => return Ok(f),
                Hop::Redirect(next) => {
                    if !seen.insert(next.to_string()) {
                        return Err(Failure::new("redirect-loop", format!("{next} was already visited")));
                    }
                    current = next;
                }
            }
        }
        Err(Failure::new(
            "too-many-redirects",
            format!("more than {} redirects (last: {current})", self.config.max_redirects),
        ))
    }

    async fn hop(&self, url: &Url) -> std::result::Result<Hop, Failure> {
        let host = self.host(url);
        let _permit = host
            .permits
            .acquire()
            .await
            .map_err(|_| Failure::new("cancelled", "the run is stopping"))?;
        if self.config.per_host_rate > 0.0 {
            let start = {
                let mut next = host.next_start.lock().await;
                let start = (*next).max(Instant::now());
                *next = start + Duration::from_secs_f64(1.0 / self.config.per_host_rate);
                start
            };
            tokio::time::sleep_until(start).await;
        }
        match tokio::time::timeout(self.config.timeout, self.request(url)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                "timeout",
                format!("no complete response within {:.1}s", self.config.timeout.as_secs_f64()),
            )
            .retryable()),
        }
    }

    async fn request(&self, url: &Url) -> std::result::Result<Hop, Failure> {
        let mut resp = self.client.get(url.clone()).send().await.map_err(network_failure)?;
        let status = resp.status();
        let code = status.as_u16();
        let headers = resp.headers().clone();
        if status.is_redirection() {
            if let Some(loc) = headers.get(LOCATION).and_then(|l| l.to_str().ok()) {
                let next = url
                    .join(loc)
                    .map_err(|e| Failure::new("bad-redirect", format!("Location {loc:?}: {e}")).status(code))?;
                return Ok(Hop::Redirect(next));
            }
        }
        if self.config.honour_opt_out {
            if let Some(why) = opted_out(&headers) {
                return Err(Failure::new("opt-out", why).status(code));
            }
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let mut f = Failure::new("http-429", "429 Too Many Requests")
                .status(code)
                .retryable();
            f.retry_after = retry_after(&headers);
            return Err(f);
        }
        if status.is_server_error() {
            return Err(Failure::new(format!("http-{code}"), status.to_string())
                .status(code)
                .retryable());
        }
        if !status.is_success() {
            return Err(Failure::new(format!("http-{code}"), status.to_string()).status(code));
        }
        let max = self.config.max_bytes;
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = declared.filter(|&n| n > max) {
            return Err(
                Failure::new("too-large", format!("Content-Length {n} exceeds --max-bytes {max}")).status(code),
            );
        }
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(max) as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            Failure::new(
                "truncated",
                format!("body ended after {} bytes: {}", bytes.len(), chain(&e)),
            )
            .status(code)
            .retryable()
        })? {
            if bytes.len() as u64 + chunk.len() as u64 > max {
                return Err(Failure::new("too-large", format!("body exceeds --max-bytes {max}")).status(code));
            }
            bytes.extend_from_slice(&chunk);
        }
        if let Some(n) = declared.filter(|&n| n != bytes.len() as u64) {
            return Err(Failure::new(
                "truncated",
                format!("body has {} bytes, Content-Length said {n}", bytes.len()),
            )
            .status(code)
            .retryable());
        }
        Ok(Hop::Done(Fetched {
            bytes,
            http_status: code,
            final_url: url.to_string(),
            content_type: headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }))
    }
}

enum Hop {
    Done(Fetched),
    Redirect(Url),
}

/// `Retry-After` in seconds (an HTTP date is taken as "retry after the backoff").
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = s.source();
    }
    text
}

fn network_failure(e: reqwest::Error) -> Failure {
    let text = chain(&e);
    if e.is_timeout() {
        Failure::new("timeout", text).retryable()
    } else if e.is_connect() {
        Failure::new("connect-error", text).retryable()
    } else if e.is_builder() {
        Failure::new("bad-url", text)
    } else {
        Failure::new("network-error", text).retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn tags(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-robots-tag", HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn opt_out_directives_apply_to_everyone_or_to_imglish_only() {
        assert!(opted_out(&tags(&["noai"])).is_some());
        assert!(opted_out(&tags(&["index, NoImageAI"])).is_some());
        assert!(opted_out(&tags(&["imglish: noindex"])).is_some());
        assert!(opted_out(&tags(&["otherbot: noai", "noarchive"])).is_none());
        assert!(opted_out(&tags(&["nofollow"])).is_none());
        assert!(opted_out(&HeaderMap::new()).is_none());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let config = FetchConfig {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            ..FetchConfig::default()
        };
        let f = Fetcher::new(config, 1).expect("client");
        let (a, b, c) = (f.backoff(5, 1), f.backoff(5, 2), f.backoff(5, 4));
        assert!(
            a >= Duration::from_millis(50) && a <= Duration::from_millis(100),
            "{a:?}"
        );
        assert!(
            b >= Duration::from_millis(100) && b <= Duration::from_millis(200),
            "{b:?}"
        );
        assert_eq!(c, Duration::from_millis(300));
        assert_eq!(f.backoff(5, 2), b, "the same row waits the same");
    }

    #[test]
    fn the_user_agent_names_imglish_and_the_contact() {
        let ua = user_agent(Some("data-team@example.org"));
        assert!(ua.starts_with("imglish/"), "{ua}");
        assert!(ua.ends_with("; contact: data-team@example.org)"), "{ua}");
    }
}
