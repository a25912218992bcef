//! Image data over the API: uploads that become image versions, and the manifest and chunk reads
//! nodes use to replicate versions from each other.

use axum::body::Body as RawBody;
use axum::extract::{Path, State as AxumState};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use cairn_blockstore::chunks::ChunkHash;
use cairn_blockstore::image::NoProgress;
use cairn_consensus::domain::{Command, Event, EventPayload, Hash32, Name};

use super::error::ApiError;
use super::{parse, write, Actor, Shared};
use crate::storage::manifest_hash;

pub async fn get_manifest(
    AxumState(state): AxumState<Shared>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let hash: Hash32 = parse(&hash)?;
    let manifest = state
        .storage
        .store
        .load_manifest(&manifest_hash(&hash))
        .map_err(|e| ApiError::not_found(format!("manifest {hash}: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        manifest.encode(),
    )
        .into_response())
}

pub async fn get_chunk(
    AxumState(state): AxumState<Shared>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let chunk = ChunkHash::from_hex(&hash)
        .ok_or_else(|| ApiError::bad_request(format!("{hash:?} is not a chunk hash")))?;
    let store = state.storage.store.clone();
    // Verified against its hash on the way out too: a corrupt chunk is reported, never sent.
    let data = tokio::task::spawn_blocking(move || store.read_chunk_uncached(&chunk))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::not_found(format!("chunk {hash}: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        data.to_vec(),
    )
        .into_response())
}

/// The body is a disk image (raw, qcow2, VHD/VHDX or VMDK). It is spooled to the node's disk,
/// imported into the chunk store, and recorded as the image's next version.
pub async fn import_image(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(name): Path<String>,
    body: RawBody,
) -> Result<Json<Vec<Event>>, ApiError> {
    let image: Name = parse(&name)?;
    let begun = state
        .cluster
        .propose(
            actor.clone(),
            Command::BeginImageVersion {
                image: image.clone(),
            },
        )
        .await?;
    let version = begun
        .iter()
        .find_map(|e| match &e.payload {
            EventPayload::ImageVersionBegun { version, .. } => Some(*version),
            _ => None,
        })
        .ok_or_else(|| ApiError::internal("no version was begun"))?;
    let result = spool_and_import(&state, &image, version, body).await;
    match result {
        Ok((manifest, size_bytes)) => {
            let mut events = begun;
            let Json(done) = write(
                &state,
                actor,
                Command::CompleteImageVersion {
                    image,
                    version,
                    manifest,
                    size_bytes,
                },
            )
            .await?;
            events.extend(done);
            Ok(Json(events))
        }
        Err(error) => {
            // Leave no version behind in `importing`.
            let _ = state
                .cluster
                .propose(actor, Command::RetireImageVersion { image, version })
                .await;
            Err(error)
        }
    }
}

async fn spool_and_import(
    state: &Shared,
    image: &Name,
    version: u32,
    body: RawBody,
) -> Result<(Hash32, u64), ApiError> {
    let uploads = state.config.data_dir.join("uploads");
    tokio::fs::create_dir_all(&uploads)
        .await
        .map_err(|e| ApiError::internal(format!("{}: {e}", uploads.display())))?;
    let path = uploads.join(format!(
        "{image}-{version}-{}.img",
        crate::secrets::random_secret()
    ));
    let spooled = async {
        let mut file = tokio::fs::File::create(&path).await?;
        let mut stream = body.into_data_stream();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            bytes += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok::<u64, std::io::Error>(bytes)
    }
    .await;
    let bytes = match spooled {
        Ok(bytes) => bytes,
        Err(error) => {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(ApiError::bad_request(format!(
                "upload interrupted: {error}"
            )));
        }
    };
    if bytes == 0 {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(ApiError::bad_request("the uploaded image is empty"));
    }
    let store = state.storage.store.clone();
    let (name, path_for_import) = (image.to_string(), path.clone());
    let outcome = tokio::task::spawn_blocking(move || {
        store.import_file(
            &path_for_import,
            &name,
            u64::from(version),
            None,
            &NoProgress,
        )
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()));
    let _ = tokio::fs::remove_file(&path).await;
    let outcome = outcome?.map_err(|e| ApiError::bad_request(format!("import failed: {e}")))?;
    Ok((
        Hash32(outcome.manifest_hash.0 .0),
        outcome.manifest.size_bytes,
    ))
}
