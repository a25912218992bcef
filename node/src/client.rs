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
    /// Tried in turn when `server` refuses the connection; never after a request was sent.
    other_servers: Vec<String>,
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
        // An explicit server means that one only; the config's list backs up the config's server.
        let other_servers = if flags.server.is_some() {
            Vec::new()
        } else {
            file.other_servers
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
            other_servers: other_servers
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect(),
            token,
        })
    }

    /// Sends the request built by `build` to the server, then to each of the other servers
    /// while the connection is refused. A connection error means nothing was sent, so even a
    /// command is safe to send again.
    async fn send(
        &self,
        path: &str,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<(String, reqwest::Response)> {
        let mut servers = std::iter::once(&self.server).chain(&self.other_servers);
        let mut last = None;
        for server in &mut servers {
            let url = format!("{server}{path}");
            let mut request = build(&url);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            match request.send().await {
                Ok(response) => return Ok((url, response)),
                Err(error) if error.is_connect() => {
                    last = Some(anyhow::Error::new(error).context(format!("cannot reach {url}")))
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error).context(format!("cannot reach {url}")))
                }
            }
        }
        Err(last.expect("at least one server"))
    }

    pub async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let (url, response) = self
            .send(path, |url| {
                let request = self.http.request(method.clone(), url);
                match body {
                    Some(body) => request.json(body),
                    None => request,
                }
            })
            .await?;
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
        let (url, response) = self.send(path, |url| self.http.get(url)).await?;
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
