//! Building a projection anew once, outside a supervisor: what a batch worker
//! does with a projection it claimed under a lease.

use projectionist::{
    CancelToken, Error, GlobalReader, ProjectionDir, ProjectionTarget, PublishOptions, Published,
    RebuildOptions, SqliteCheckpoint, Start,
};

use crate::projection::Supervised;

/// Builds `projection` anew from the whole log, once: in its shadow when its
/// live file serves a built version (then published, the live file serving
/// the old version until then: the publish is returned), else in place.
/// `guard` is asked before every commit and before the publish (a lease's
/// fence); `cancel` stops the build at a batch boundary.
///
/// # Errors
/// The build's error ([`Error::Fenced`] when the guard refused); a failed
/// publish leaves the live file unchanged.
pub fn rebuild_once<E: Send + Sync>(
    dir: &ProjectionDir,
    reader: &dyn GlobalReader<E>,
    projection: &mut Supervised<E>,
    batch_size: u32,
    guard: Option<&projectionist::CommitGuardFn<'_>>,
    cancel: &CancelToken,
) -> projectionist::Result<Option<Published>> {
    let name = projection.name().to_owned();
    let live = dir.db(&name)?;
    let serving = live.with_connection(|conn| SqliteCheckpoint::load_in(conn, &name))? > 0;
    let db = if serving {
        dir.discard_shadow(&name)?;
        dir.shadow(&name)?
    } else {
        live
    };
    let mut options = RebuildOptions::new().batch_size(batch_size).cancel(cancel);
    options.commit_guard = guard;
    let target = ProjectionTarget::new(&db, &mut *projection.handler)
        .consumer_id(&name)
        .start(Start::Reset);
    projectionist::replay(reader, vec![target], &options)
        .pop()
        .expect("one result per projection")?;
    if !serving {
        return Ok(None);
    }
    drop(db);
    if let Some(guard) = guard {
        guard(&name).map_err(|source| Error::Fenced {
            name: name.clone(),
            committed: 0,
            source,
        })?;
    }
    dir.publish(&name, &name, &PublishOptions::default())
        .map(Some)
}
