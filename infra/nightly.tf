# The nightly job: a Cloud Run job runs `embedpipe nightly` (the driver), Cloud Scheduler starts it.

resource "google_cloud_run_v2_job" "nightly" {
  name                = "embedpipe-nightly"
  project             = var.project_id
  location            = var.region
  deletion_protection = var.deletion_protection

  template {
    # One driver per night: the run is a single process that owns LATEST while it publishes.
    task_count  = 1
    parallelism = 1

    template {
      service_account       = google_service_account.driver.email
      timeout               = "${var.driver_timeout_hours * 3600}s"
      max_retries           = var.driver_max_retries
      execution_environment = "EXECUTION_ENVIRONMENT_GEN2"
      encryption_key        = var.kms_key_name

      containers {
        name  = "embedpipe"
        image = local.driver_image

        # The image's entry point is `embedpipe`; these are its arguments.
        args = local.nightly_args

        resources {
          limits = {
            cpu    = var.driver_cpu
            memory = var.driver_memory
          }
        }
      }
    }
  }

  lifecycle {
    precondition {
      condition     = contains(local.gpu_families[var.gpu_type], split("-", var.machine_type)[0])
      error_message = "machine_type ${var.machine_type} cannot carry ${var.gpu_type}: use a ${join("/", local.gpu_families[var.gpu_type])}-* machine type."
    }
  }

  depends_on = [
    google_project_service.apis,
    google_project_iam_member.driver_dataflow,
    google_service_account_iam_member.driver_acts_as_worker,
    google_storage_bucket_iam_member.driver_data,
    google_kms_crypto_key_iam_member.cloud_run,
  ]
}

# Cloud Scheduler sends the same request every night (its body cannot carry the date), so the
# request only says "run the job"; `embedpipe nightly` names the run from the UTC start time.
resource "google_cloud_scheduler_job" "nightly" {
  name        = "embedpipe-nightly"
  project     = var.project_id
  region      = var.region
  description = "Starts the embedpipe-nightly Cloud Run job (embed on Dataflow GPUs, index, validate, publish LATEST)."
  schedule    = var.schedule
  time_zone   = var.time_zone
  paused      = var.scheduler_paused

  # The :run call returns as soon as the execution is created; the night's work is not awaited.
  attempt_deadline = "180s"

  # Retries only when starting the execution failed (non-2xx), e.g. a transient API error.
  retry_config {
    retry_count          = 2
    min_backoff_duration = "60s"
    max_backoff_duration = "300s"
  }

  http_target {
    http_method = "POST"
    uri         = "https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/${google_cloud_run_v2_job.nightly.name}:run"
    headers     = { "Content-Type" = "application/json" }
    body        = base64encode("{}")

    # A Google API is called with an OAuth access token (an OIDC token is for Cloud Run services).
    oauth_token {
      service_account_email = google_service_account.scheduler.email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }

  depends_on = [google_project_service.apis, google_cloud_run_v2_job_iam_member.scheduler_runs_nightly]
}
