//! Applying an increment to a raw image or block device: in place, marked pending until
//! done (a raw file has no tables to switch).

use super::*;

pub(super) fn apply_raw(job: Job<'_>, report: &mut ApplyReport) -> Result<()> {
    let Job {
        target, inc, opts, ..
    } = job;
    crate::io::refuse_special(target)?;
    let meta = std::fs::metadata(target).map_err(|e| Error::io("stat", target, 0, e))?;
    let block = meta.file_type().is_block_device();
    if block && !opts.allow_device_write {
        return Err(Error::refused(
            target,
            format!(
                "`{}` is a block device: refusing to write into it",
                target.display()
            ),
            Some(crate::error::Override::AllowDeviceWrite),
        ));
    }
    if !opts.force {
        return Err(Error::refused(
            target,
            format!(
                "a raw target has no content ID to check the increment against (it applies to content ID {}): force it once you are sure `{}` holds that content; nothing was written",
                cid_text(inc.parent_cid),
                target.display()
            ),
            Some(crate::error::Override::Force),
        ));
    }
    let mut locks = LockSet::new();
    locks.lock(target, LockKind::Exclusive)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(|e| Error::io("open for writing", target, 0, e))?;
    let size =
        crate::io::device_size(&f).map_err(|e| Error::io("get the size of", target, 0, e))?;
    if size < inc.capacity {
        return Err(Error::InvalidInput(format!(
            "`{}` holds {size} bytes, less than the increment's disk of {} bytes; nothing was written",
            target.display(),
            inc.capacity
        )));
    }
    // Every grain of the increment, before the first write.
    validate(job, None)?;
    // A raw file has no descriptor to mark: a state file beside it says that its
    // in-place writes are under way (readers of it refuse it until the rerun). A block
    // device's folder (/dev) is not ours to write: the interruption note is all it gets.
    let sp = (!block).then(|| state_path(target));
    if let Some(sp) = &sp {
        recovery::write(
            sp,
            &serde_json::json!({"raw": true, "parent_cid": inc.parent_cid, "cid": inc.cid}),
        )?;
    }
    crate::guard::set_interrupt_note(Some(format!(
        "the apply into `{}` is incomplete: run the same apply again to finish it",
        target.display()
    )));
    let written = read_grains(
        job,
        report,
        &mut |off, b| {
            f.write_all_at(b, off)
                .map_err(|e| crate::io::write_error(target, off, e))
        },
        &mut |off, len| crate::output::zero_range(&f, target, block, off, len),
    )
    .and_then(|()| f.sync_all().map_err(|e| Error::io("flush", target, 0, e)))
    .and_then(|()| match &sp {
        Some(sp) => recovery::remove_state_files(std::slice::from_ref(sp)),
        None => Ok(()),
    });
    crate::guard::set_interrupt_note(None);
    written.map_err(|e| {
        Error::chain(
            target,
            format!(
                "the apply is incomplete ({e}); run the same apply again to finish it: its writes are idempotent"
            ),
        )
    })
}
