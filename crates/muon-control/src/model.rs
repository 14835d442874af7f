//! What the registry keeps of each object: the object, where it came from, and its
//! generation. Shared by the registry, the store and the conversions, so that none of them
//! depends on another for these types.

use muon_core::resource::Object;

/// Where an object came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The management API (persisted in the store).
    Api,
    /// The `--config-dir` directory; read-only through the API.
    File,
    /// The Kubernetes API (`kubernetes`), changed by key through
    /// [`crate::registry::Registry::update_source`].
    Kubernetes,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// An object with what the registry knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub object: Object,
    /// Increases with every change of this object.
    pub generation: u64,
    pub source: Source,
}

/// A change, for the management API's Watch.
#[derive(Debug, Clone)]
pub struct Event {
    pub deleted: bool,
    pub stored: Stored,
    pub version: u64,
}
