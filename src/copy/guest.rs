//! Guest-aware copies: the scan's free map laid over the source, the output's metadata
//! marked, the report filled (`crate::guest` reads the maps; this is how a command uses
//! them).

use std::sync::Arc;

use crate::copy::target::{ExportReport, OutputMeta};
use crate::disk::VirtualDisk;
use crate::error::Result;
use crate::guest::{FreeMap, GuestReport, GuestView};

/// What a guest-aware copy leaves out (nothing when not asked for).
pub(crate) struct Guest {
    found: Option<(Arc<FreeMap>, GuestReport)>,
    none: FreeMap,
}

impl Guest {
    /// Scan `disk` (a chain's merged view) when `on`.
    pub(crate) fn scan(disk: &dyn VirtualDisk, on: bool) -> Result<Guest> {
        let found = match on {
            true => {
                let (free, report) = crate::guest::scan(disk)?;
                Some((Arc::new(free), report))
            }
            false => None,
        };
        Ok(Guest {
            found,
            none: FreeMap::default(),
        })
    }

    /// `disk` with the free grains left out (unchanged when none are).
    pub(crate) fn view<'a>(&'a self, disk: &'a dyn VirtualDisk) -> GuestView<'a> {
        GuestView::new(disk, self.found.as_ref().map_or(&self.none, |(f, _)| f))
    }

    /// Mark the output's metadata guest-aware.
    pub(crate) fn mark(&self, meta: &mut OutputMeta) {
        if let Some((free, _)) = &self.found {
            meta.mark_guest_aware(free.clone());
        }
    }

    /// What the scan found (none when not asked for).
    pub(crate) fn found(&self) -> Option<GuestReport> {
        self.found.as_ref().map(|(_, g)| g.clone())
    }

    /// Add what the scan found to a copy's report.
    pub(crate) fn report(&self, mut r: ExportReport) -> ExportReport {
        r.guest = self.found();
        r
    }
}
