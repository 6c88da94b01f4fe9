# The data bucket: ROOT/runs/<run-id>/, ROOT/LATEST, and Dataflow's temp and staging files.
#
# Old runs are pruned by `embedpipe nightly --keep N` after each successful publish, because only
# the application knows which run LATEST names. The bucket's own lifecycle rules are the safety
# net beneath it: abandoned runs, Dataflow temp files, overwritten versions, broken uploads.
resource "google_storage_bucket" "data" {
  #checkov:skip=CKV_GCP_62:usage/storage logs are a legacy feature; reads and writes are audited with Cloud Audit Logs (Data Access logs for storage.googleapis.com), which infra/README.md says how to enable
  name     = local.bucket_name
  project  = var.project_id
  location = local.bucket_location

  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # Never delete the published runs with `terraform destroy`.
  force_destroy = false

  # Versioning keeps an overwritten LATEST pointer (or a run deleted by mistake) recoverable for
  # noncurrent_version_days.
  versioning {
    enabled = true
  }

  # Soft delete would keep every deleted object another 7+ days on top of versioning; the nightly
  # job renames (copies, then deletes) a whole night of output, so that would double storage for
  # a week without adding a recovery path versioning does not already give.
  soft_delete_policy {
    retention_duration_seconds = 0
  }

  dynamic "encryption" {
    for_each = var.kms_key_name == null ? [] : [var.kms_key_name]
    content {
      default_kms_key_name = encryption.value
    }
  }

  # Safety net for runs that `--keep` never pruned (e.g. abandoned by a killed night).
  dynamic "lifecycle_rule" {
    for_each = var.run_retention_days > 0 ? [var.run_retention_days] : []
    content {
      condition {
        age            = lifecycle_rule.value
        matches_prefix = ["${var.root_prefix}/runs/"]
      }
      action {
        type = "Delete"
      }
    }
  }

  # Dataflow's temp and staging files are useless once their job has ended.
  lifecycle_rule {
    condition {
      age            = var.dataflow_temp_retention_days
      matches_prefix = ["dataflow/tmp/", "dataflow/staging/"]
    }
    action {
      type = "Delete"
    }
  }

  # Overwritten and deleted objects: recoverable for a few days, then gone.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  # Multipart uploads of a killed writer are invisible but billed until aborted.
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_project_service.apis, google_kms_crypto_key_iam_member.storage]
}
