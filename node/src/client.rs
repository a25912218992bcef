//! The CLI's client of the admin API.

use anyhow::{anyhow, bail, Context};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::types::ErrorBody;
use crate::config::CliConfig;
use crate::https;

pub struct ApiClient {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

/// Where the CLI finds the server, token and CA: flags, then environment, then the CLI config.
pub struct Connection {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
}

impl ApiClient {
    pub fn connect(flags: Connection) -> anyhow::Result<ApiClient> {
        let file = match CliConfig::default_path() {
            Some(path) => CliConfig::load(&path)?,
            None => CliConfig::default(),
        };
        let server = flags.server.or(file.server).ok_or_else(|| {
            anyhow!("no server: pass --server https://ip:7400, set CAIRN_SERVER, or run `cairn cluster init` here")
        })?;
        let token = flags.token.or(file.token);
        let ca_file = flags.ca_file.or(file.ca_file).ok_or_else(|| {
            anyhow!("no cluster CA certificate: pass --ca FILE (a node's <data-dir>/tls/ca.pem) or set CAIRN_CA")
        })?;
        let ca = std::fs::read_to_string(&ca_file)
            .with_context(|| format!("cannot read {}", ca_file.display()))?;
        Ok(ApiClient {
            http: https::client(&ca)?,
            server: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{}", self.server, path);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(error) => bail!("{} ({})", error.message, status.as_u16()),
                Err(_) => bail!("{} from {url}: {}", status, String::from_utf8_lossy(&bytes)),
            }
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from {url}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.request::<(), T>(Method::GET, path, None).await
    }

    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("{}{}", self.server, path);
        let mut request = self.http.get(&url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            match serde_json::from_str::<ErrorBody>(&text) {
                Ok(error) => bail!("{} ({})", error.message, status.as_u16()),
                Err(_) => bail!("{status} from {url}"),
            }
        }
        Ok(text)
    }

    /// Streams `file` as the request body (PUT), showing progress on the terminal.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &std::path::Path,
    ) -> anyhow::Result<T> {
        use cairn_blockstore::image::{ImportProgress, TerminalProgress};
        use futures::StreamExt;
        let size = tokio::fs::metadata(file)
            .await
            .with_context(|| format!("cannot read {}", file.display()))?
            .len();
        let handle = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {}", file.display()))?;
        let progress = std::sync::Arc::new(TerminalProgress::new(format!(
            "uploading {}",
            file.display()
        )));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (progress_in_stream, sent_in_stream) = (progress.clone(), sent.clone());
        let stream =
            tokio_util::io::ReaderStream::with_capacity(handle, 1 << 20).inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    let done = sent_in_stream
                        .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed)
                        + chunk.len() as u64;
                    progress_in_stream.update(done, size);
                }
            });
        let url = format!("{}{}", self.server, path);
        let mut request = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .timeout(std::time::Duration::from_secs(24 * 3600))
            .body(reqwest::Body::wrap_stream(stream));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot upload to {url}"))?;
        progress.finish(sent.load(std::sync::atomic::Ordering::Relaxed), size);
        eprintln!("importing on the server...");
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(error) => bail!("{} ({})", error.message, status.as_u16()),
                Err(_) => bail!("{} from {url}", status),
            }
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from {url}"))
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.request(Method::POST, path, Some(body)).await
    }
}
