//! The discovery resource kinds: the one table both ends of the discovery stream read, so a
//! new kind is one more row here instead of another literal index in every module.

use std::ops::{Index, IndexMut};

pub const SERVICES: &str = "services";
pub const ENDPOINTS: &str = "endpoints";
pub const ROUTES: &str = "routes";
pub const POLICIES: &str = "policies";

/// One discovery resource kind (a `type_url`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Services,
    Endpoints,
    Routes,
    Policies,
}

/// How many kinds there are: the length of every per-kind array.
pub const COUNT: usize = ResourceKind::ALL.len();

/// Every `type_url`, in the order of [`ResourceKind::ALL`].
pub const ALL: [&str; COUNT] = [SERVICES, ENDPOINTS, ROUTES, POLICIES];

impl ResourceKind {
    pub const ALL: [ResourceKind; 4] = [
        ResourceKind::Services,
        ResourceKind::Endpoints,
        ResourceKind::Routes,
        ResourceKind::Policies,
    ];

    pub fn type_url(self) -> &'static str {
        ALL[self.index()]
    }

    /// Position in [`ResourceKind::ALL`] (and in every [`PerKind`]).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_type_url(type_url: &str) -> Option<ResourceKind> {
        Self::ALL.into_iter().find(|k| k.type_url() == type_url)
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.type_url())
    }
}

/// One `T` per kind, indexed by [`ResourceKind`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerKind<T>(pub [T; COUNT]);

impl<T> PerKind<T> {
    pub fn iter(&self) -> impl Iterator<Item = (ResourceKind, &T)> {
        ResourceKind::ALL.into_iter().zip(self.0.iter())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ResourceKind, &mut T)> {
        ResourceKind::ALL.into_iter().zip(self.0.iter_mut())
    }

    pub fn values(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    pub fn values_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.0.iter_mut()
    }
}

impl<T> Index<ResourceKind> for PerKind<T> {
    type Output = T;
    fn index(&self, k: ResourceKind) -> &T {
        &self.0[k.index()]
    }
}

impl<T> IndexMut<ResourceKind> for PerKind<T> {
    fn index_mut(&mut self, k: ResourceKind) -> &mut T {
        &mut self.0[k.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_type_url_and_index() {
        for (i, k) in ResourceKind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(ResourceKind::from_type_url(k.type_url()), Some(k));
        }
        assert_eq!(ResourceKind::from_type_url("clusters"), None);
        let mut per: PerKind<u32> = PerKind::default();
        per[ResourceKind::Routes] += 2;
        assert_eq!(per.0, [0, 0, 2, 0]);
    }
}
