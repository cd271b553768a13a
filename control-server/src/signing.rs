//! The origin's signing key (issue 13): loaded from `--signing-key FILE`, created there at the
//! first start, or made fresh for the process when no file is named. A leaf module.
//!
//! The file holds the 32-byte ed25519 seed as 64 hex digits (and a newline); it is created
//! readable by its owner only. Viewers pin the matching public key in the player's
//! `public_key` option, so keep the file: a new key makes pinned players refuse the stream.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SigningKeyError {
    #[error("reading the signing key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing a new signing key to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the signing key {path} is not 64 hex digits (an ed25519 seed)")]
    Malformed { path: PathBuf },
    #[error("no random source for a signing key: {0}")]
    Random(String),
}

/// A fresh 32-byte seed from the OS.
pub fn random_seed() -> Result<[u8; 32], SigningKeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| SigningKeyError::Random(e.to_string()))?;
    Ok(seed)
}

/// A seed derived from a cluster's shared secret: every node of the cluster signs with the same
/// key without a key file to copy around. Pin the public key from `/api/channels/{id}/key`.
#[cfg(feature = "cluster")]
pub fn seed_from_secret(secret: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"p2p-stream-signing-key\0");
    h.update(secret);
    h.finalize().into()
}

/// The seed in `path`, or a new one written there if the file does not exist.
pub fn load_or_create(path: &Path) -> Result<[u8; 32], SigningKeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            protocol::manifest::from_hex(text.trim()).ok_or_else(|| SigningKeyError::Malformed {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = random_seed()?;
            write_private(path, &format!("{}\n", protocol::manifest::hex(&seed))).map_err(
                |source| SigningKeyError::Write {
                    path: path.to_owned(),
                    source,
                },
            )?;
            tracing::info!(path = %path.display(), "created a new stream signing key");
            Ok(seed)
        }
        Err(source) => Err(SigningKeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_key_is_created_once_then_read_back_and_garbage_is_named() {
        let dir = std::env::temp_dir().join(format!("p2p-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("origin.key");
        let _ = std::fs::remove_file(&path);
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by its owner only");
        }
        std::fs::write(&path, "not a key").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
