# Docker repository for the two images built from the repository's Dockerfile:
#   embedpipe:TAG         --target worker: the Dataflow SDK container (GPU workers)
#   embedpipe-driver:TAG  --target driver: the Cloud Run job that runs `embedpipe nightly`
resource "google_artifact_registry_repository" "images" {
  project       = var.project_id
  location      = var.region
  repository_id = var.repository_id
  description   = "embedpipe worker and driver images"
  format        = "DOCKER"
  kms_key_name  = var.kms_key_name # null: Google-managed keys (see cmek.tf)

  # A tag always names the same image: a job that ran with TAG can be re-run or debugged with
  # exactly that image, and a push can never silently change what the next night runs.
  docker_config {
    immutable_tags = true
  }

  # Untagged manifests are leftovers of interrupted or replaced pushes.
  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "delete-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "1209600s" # 14 days
    }
  }

  depends_on = [google_project_service.apis, google_kms_crypto_key_iam_member.artifact_registry]
}
