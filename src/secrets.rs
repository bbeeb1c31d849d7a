//! Encryption at rest for rule and webhook secrets.
//!
//! A [`SecretBox`] holds one AES-256-GCM key. The key comes from `VERDICT_SECRET_KEY`
//! when it is set, else from `DATA_DIR/secret.key`, which is generated on first start.
//!
//! Key from the environment: a value that is standard base64 of exactly 32 bytes is
//! used as the key itself; any other non-empty value is a passphrase, and the key is
//! SHA-256 of its UTF-8 bytes. The key file holds standard base64 of 32 random bytes.
//!
//! Ciphertext format: `v1:` followed by standard base64 of `nonce (12 bytes) ||
//! ciphertext || tag (16 bytes)`. The version prefix leaves room for key rotation.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Name of the key file inside the data directory.
pub const KEY_FILE_NAME: &str = "secret.key";

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What can go wrong loading a key or decrypting a secret. Messages never contain key
/// material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key file could not be read or created.
    #[error("secret key file `{path}`: {message}")]
    KeyFile {
        /// The key file's path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The key given or found is unusable.
    #[error("bad secret key: {0}")]
    BadKey(String),
    /// The stored value is not in the `v1:` format.
    #[error("malformed encrypted secret: {0}")]
    Malformed(&'static str),
    /// Authentication failed: wrong key or tampered data.
    #[error("secret could not be decrypted (wrong key or corrupted data)")]
    Decrypt,
}

/// Where the key of a [`SecretBox`] came from; for the startup log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `VERDICT_SECRET_KEY` held base64 of 32 bytes.
    EnvRaw,
    /// `VERDICT_SECRET_KEY` held a passphrase, hashed with SHA-256.
    EnvPassphrase,
    /// The key file existed and was read.
    FileExisting,
    /// The key file was generated now.
    FileCreated,
    /// The key was handed over directly (tests, tools).
    Direct,
}

/// AES-256-GCM encryption of secrets at rest.
pub struct SecretBox {
    cipher: Aes256Gcm,
    source: KeySource,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key must never reach a log line.
        f.debug_struct("SecretBox").field("key", &"********").field("source", &self.source).finish()
    }
}

impl SecretBox {
    /// Builds a box from raw key bytes.
    pub fn from_key(key: [u8; 32]) -> SecretBox {
        SecretBox::with_source(key, KeySource::Direct)
    }

    fn with_source(key: [u8; 32], source: KeySource) -> SecretBox {
        SecretBox { cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)), source }
    }

    /// Loads the key: from `env_key` (the value of `VERDICT_SECRET_KEY`) when given,
    /// else from `data_dir/secret.key`, creating the directory and the file (mode 0600,
    /// 32 random bytes in base64) when it does not exist yet.
    ///
    /// An existing key file that does not hold base64 of 32 bytes is an error, never
    /// replaced: replacing it would make every stored secret unreadable.
    pub fn load_or_create(data_dir: &Path, env_key: Option<&str>) -> Result<SecretBox, SecretError> {
        if let Some(value) = env_key {
            return SecretBox::from_env_value(value);
        }
        let path = data_dir.join(KEY_FILE_NAME);
        let file_err = |message: String| SecretError::KeyFile { path: path.clone(), message };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                warn_if_readable_by_others(&path);
                let key = decode_key(text.trim()).ok_or_else(|| file_err("does not hold base64 of 32 bytes".into()))?;
                Ok(SecretBox::with_source(key, KeySource::FileExisting))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(|e| file_err(e.to_string()))?;
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                match create_key_file(&path, &key) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "generated a new secret key file");
                        Ok(SecretBox::with_source(key, KeySource::FileCreated))
                    }
                    // Another process created it between our read and our create: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
                        let key = decode_key(text.trim())
                            .ok_or_else(|| file_err("does not hold base64 of 32 bytes".into()))?;
                        Ok(SecretBox::with_source(key, KeySource::FileExisting))
                    }
                    Err(e) => Err(file_err(e.to_string())),
                }
            }
            Err(e) => Err(file_err(e.to_string())),
        }
    }

    fn from_env_value(value: &str) -> Result<SecretBox, SecretError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(SecretError::BadKey("VERDICT_SECRET_KEY is empty".into()));
        }
        if let Some(key) = decode_key(value) {
            return Ok(SecretBox::with_source(key, KeySource::EnvRaw));
        }
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        Ok(SecretBox::with_source(key, KeySource::EnvPassphrase))
    }

    /// Where this box's key came from.
    pub fn key_source(&self) -> KeySource {
        self.source
    }

    /// Encrypts `plaintext` with a fresh random 96-bit nonce; returns `v1:` + base64.
    pub fn encrypt(&self, plaintext: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        #[allow(
            clippy::expect_used,
            reason = "AES-GCM fails only for plaintexts over 64 GiB, which a &str of secrets never is"
        )]
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .expect("AES-GCM encryption of a small plaintext cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", B64.encode(out))
    }

    /// Decrypts a value made by [`SecretBox::encrypt`]. A wrong key or altered data is
    /// [`SecretError::Decrypt`].
    pub fn decrypt(&self, s: &str) -> Result<String, SecretError> {
        let body = s.strip_prefix(PREFIX).ok_or(SecretError::Malformed("missing `v1:` prefix"))?;
        let bytes = B64.decode(body).map_err(|_| SecretError::Malformed("not base64"))?;
        if bytes.len() < NONCE_LEN + TAG_LEN {
            return Err(SecretError::Malformed("too short"));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let plain = self.cipher.decrypt(Nonce::from_slice(nonce), sealed).map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| SecretError::Decrypt)
    }
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    B64.decode(text).ok()?.try_into().ok()
}

/// Writes the key to a temporary file created with mode 0600, then links it into place,
/// so the key file is never world-readable, never half-written, and never overwrites a
/// key another process created at the same moment.
fn create_key_file(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = dir.join(format!(".{KEY_FILE_NAME}.{}.tmp", uuid::Uuid::new_v4()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(B64.encode(key).as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        drop(file);
        // hard_link fails with AlreadyExists instead of replacing, unlike rename.
        std::fs::hard_link(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            // Make the new directory entry durable; best effort, the key is already written.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "secret key file is readable by group or others; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fresh_nonce() {
        let b = SecretBox::from_key([7u8; 32]);
        let a1 = b.encrypt("hunter2");
        let a2 = b.encrypt("hunter2");
        assert!(a1.starts_with("v1:"));
        assert_ne!(a1, a2, "each encryption uses a new nonce");
        assert!(!a1.contains("hunter2"));
        assert_eq!(b.decrypt(&a1).unwrap(), "hunter2");
        assert_eq!(b.decrypt(&b.encrypt("")).unwrap(), "");
    }

    #[test]
    fn wrong_key_and_garbage_are_errors() {
        let a = SecretBox::from_key([1u8; 32]);
        let b = SecretBox::from_key([2u8; 32]);
        let sealed = a.encrypt("s3cret");
        assert!(matches!(b.decrypt(&sealed), Err(SecretError::Decrypt)));
        assert!(matches!(a.decrypt("nope"), Err(SecretError::Malformed(_))));
        assert!(matches!(a.decrypt("v1:!!!"), Err(SecretError::Malformed(_))));
        assert!(matches!(a.decrypt("v1:AAAA"), Err(SecretError::Malformed(_))));
        // A flipped bit in the ciphertext fails authentication.
        let mut raw = B64.decode(&sealed[3..]).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = format!("v1:{}", B64.encode(raw));
        assert!(matches!(a.decrypt(&tampered), Err(SecretError::Decrypt)));
    }

    #[test]
    fn debug_does_not_print_key() {
        let b = SecretBox::from_key([0xAB; 32]);
        let dbg = format!("{b:?}");
        assert!(dbg.contains("********"));
        assert!(!dbg.contains("171"), "{dbg}");
        assert!(!dbg.to_lowercase().contains("abab"), "{dbg}");
    }

    #[cfg(unix)]
    #[test]
    fn key_file_created_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = SecretBox::load_or_create(&data, None).unwrap();
        assert_eq!(first.key_source(), KeySource::FileCreated);
        let path = data.join(KEY_FILE_NAME);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE_NAME)]);

        let sealed = first.encrypt("client-secret");
        let second = SecretBox::load_or_create(&data, None).unwrap();
        assert_eq!(second.key_source(), KeySource::FileExisting);
        assert_eq!(second.decrypt(&sealed).unwrap(), "client-secret");
    }

    #[test]
    fn bad_key_file_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        std::fs::write(&path, "not a key").unwrap();
        let err = SecretBox::load_or_create(dir.path(), None).unwrap_err();
        assert!(matches!(err, SecretError::KeyFile { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key");
    }

    #[test]
    fn env_key_raw_or_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let raw = B64.encode([9u8; 32]);
        let a = SecretBox::load_or_create(dir.path(), Some(&raw)).unwrap();
        assert_eq!(a.key_source(), KeySource::EnvRaw);
        let direct = SecretBox::from_key([9u8; 32]);
        assert_eq!(direct.decrypt(&a.encrypt("x")).unwrap(), "x");

        let p1 = SecretBox::load_or_create(dir.path(), Some("correct horse")).unwrap();
        let p2 = SecretBox::load_or_create(dir.path(), Some("correct horse")).unwrap();
        assert_eq!(p1.key_source(), KeySource::EnvPassphrase);
        assert_eq!(p2.decrypt(&p1.encrypt("y")).unwrap(), "y");
        let other = SecretBox::load_or_create(dir.path(), Some("wrong horse")).unwrap();
        assert!(other.decrypt(&p1.encrypt("y")).is_err());

        assert!(matches!(SecretBox::load_or_create(dir.path(), Some("  ")), Err(SecretError::BadKey(_))));
        // An env key never creates a key file.
        assert!(!dir.path().join(KEY_FILE_NAME).exists());
    }
}
