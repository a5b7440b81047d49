//! Publication: the one step of a pull that holds the images lock.

use super::error::{failed, ImageError};
use super::Images;
use crate::events::ObjectEvent;
pub(super) use crate::layout::StagingDir as Staging;
use crate::model::Image;
use crate::store::rows;
use crate::Result;

impl Images {
    /// Re-checks the name, renames staging to `images/<id>` and inserts the row, under the
    /// shelf's lock; of concurrent pulls of one name exactly one gets here first.
    pub(super) async fn publish(&self, staging: Staging, image: Image) -> Result<Image> {
        let (name, row) = (image.name.clone(), image.clone());
        self.shelf
            .publish(
                staging,
                &image.id,
                move |c| {
                    if rows::find_image(c, &name)?.is_some() {
                        return Ok(Err(ImageError::Conflict(format!(
                            "An image named {name:?} was published while this pull ran; pull \
                             again with another --name"
                        ))
                        .into()));
                    }
                    Ok(Ok(()))
                },
                move |c| rows::insert_image(c, &row).map(Ok),
            )
            .await?;
        tracing::info!(image_id = %image.id, "Image {} published", image.name);
        self.events.send(ObjectEvent::ImageAdded(image.clone()));
        Ok(image)
    }
}

impl Images {
    /// Replaces an existing image's directory and row with a staged copy (promotion), under
    /// the images lock.
    pub(super) async fn publish_over(&self, mut staging: Staging, image: Image) -> Result<Image> {
        let final_dir = self.shelf.path_of(&image.id);
        // (The staging directory is removed on drop if the row check refuses.)
        self.promote_row(image, || {
            std::fs::rename(staging.path(), &final_dir)
                .map_err(|e| failed("Cannot move the image into place", e))?;
            staging.keep();
            Ok(())
        })
        .await
    }

    /// Under the images lock: re-checks that the image is still registered (not deleted or
    /// promoted meanwhile), runs `place` (moving files into place), writes the managed row.
    async fn promote_row(&self, image: Image, place: impl FnOnce() -> Result<()>) -> Result<Image> {
        let guard = self.shelf.lock().await;
        let id = image.id.clone();
        let still = self.store.call(move |c| rows::find_image(c, &id)).await?;
        if !matches!(still, Some(ref i) if !i.managed) {
            return Err(ImageError::Gone(format!(
                "Image {:?} was deleted or promoted meanwhile",
                image.name
            ))
            .into());
        }
        place()?;
        let row = image.clone();
        self.store
            .call(move |c| rows::upsert_image(c, &row).map(|_| ()))
            .await?;
        drop(guard);
        tracing::info!(image_id = %image.id, "Image {} promoted", image.name);
        self.events.send(ObjectEvent::ImageChanged(image.clone()));
        Ok(image)
    }
}

impl Images {
    /// Marks a registered image (its copies already in `images/<id>`) managed, under the
    /// images lock.
    pub(super) async fn mark_managed(&self, image: Image) -> Result<Image> {
        self.promote_row(image, || Ok(())).await
    }
}
