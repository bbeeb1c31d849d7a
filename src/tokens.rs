//! Caller tokens and roles (SPEC §2). Only SHA-256 hashes of tokens are kept; a
//! presented token is hashed and compared in constant time with every known hash.

use std::path::Path;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Proxy,
    Auditor,
    Admin,
}

impl Role {
    /// `proxy`, `auditor` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }
}

/// A known token: its name (the audit actor), role and hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

impl TokenEntry {
    /// An entry for a plain token (from an environment variable or generation).
    pub fn from_plain(name: &str, role: Role, token: &str) -> TokenEntry {
        TokenEntry { name: name.to_owned(), role, sha256: hash(token) }
    }
}

/// Hex SHA-256 of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The set of tokens verdict accepts.
#[derive(Debug, Clone, Default)]
pub struct TokenSet {
    entries: Vec<(TokenEntry, [u8; 32])>,
}

/// The caller a token belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl TokenSet {
    /// Builds the set; entries whose hash is not 64 hex digits are reported.
    pub fn new(entries: Vec<TokenEntry>) -> Result<TokenSet, String> {
        let mut out = Vec::new();
        for e in entries {
            let mut raw = [0u8; 32];
            hex::decode_to_slice(e.sha256.trim(), &mut raw)
                .map_err(|_| format!("token `{}`: sha256 must be 64 hex digits", e.name))?;
            out.push((e, raw));
        }
        Ok(TokenSet { entries: out })
    }

    /// Whether no token is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller for a presented token. Every entry is compared, so the time taken
    /// does not tell which one matched or how much of it.
    pub fn identify(&self, token: &str) -> Option<Caller> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (entry, raw) in &self.entries {
            if bool::from(raw.ct_eq(&presented)) && found.is_none() {
                found = Some(Caller { name: entry.name.clone(), role: entry.role });
            }
        }
        found
    }
}

/// A token generated on first start: name, role, plain token (printed once).
pub type GeneratedToken = (String, Role, String);

/// Loads the generated token hashes from the data directory, or generates one token
/// per role on first start. Returns the entries and, on first start only, the plain
/// tokens to print once.
pub fn load_or_generate(data_dir: &Path) -> std::io::Result<(Vec<TokenEntry>, Vec<GeneratedToken>)> {
    let path = data_dir.join("tokens.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let entries: Vec<TokenEntry> = serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
        return Ok((entries, Vec::new()));
    }
    let mut plain = Vec::new();
    let mut entries = Vec::new();
    for (name, role) in
        [("generated-admin", Role::Admin), ("generated-proxy", Role::Proxy), ("generated-auditor", Role::Auditor)]
    {
        let mut bytes = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = format!("vdt_{}", hex::encode(bytes));
        entries.push(TokenEntry::from_plain(name, role, &token));
        plain.push((name.to_owned(), role, token));
    }
    let json = serde_json::to_string_pretty(&entries).map_err(std::io::Error::other)?;
    write_private(&path, json.as_bytes())?;
    Ok((entries, plain))
}

/// Writes a file readable by its owner only (mode 0600 from creation on).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_by_hash() {
        let set = TokenSet::new(vec![TokenEntry::from_plain("gw", Role::Proxy, "secret-token")]).unwrap();
        assert_eq!(set.identify("secret-token").map(|c| c.role), Some(Role::Proxy));
        assert_eq!(set.identify("secret-tokem"), None);
    }

    #[test]
    fn generates_once() {
        let dir = tempfile::tempdir().unwrap();
        let (entries, plain) = load_or_generate(dir.path()).unwrap();
        assert_eq!(plain.len(), 3);
        let (again, plain_again) = load_or_generate(dir.path()).unwrap();
        assert_eq!(entries, again);
        assert!(plain_again.is_empty());
        let text = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        assert!(!text.contains(&plain[0].2), "plain token must not be stored");
    }
}
