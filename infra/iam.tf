# Three identities, each with only what its step needs:
#
#   worker     the Dataflow worker VMs: read the corpus, read/write the run folders, pull the image.
#   driver     the Cloud Run job running `embedpipe nightly`: creates and watches the Dataflow job
#              (as `worker`), builds the index, publishes LATEST. Holds no data role at project level.
#   scheduler  Cloud Scheduler's caller identity: may start the driver job, nothing else.

resource "google_service_account" "worker" {
  project      = var.project_id
  account_id   = "embedpipe-worker"
  display_name = "embedpipe Dataflow workers"
  description  = "Runs the embedpipe Dataflow GPU workers: reads the corpus, writes runs/ in the data bucket."
}

resource "google_service_account" "driver" {
  project      = var.project_id
  account_id   = "embedpipe-driver"
  display_name = "embedpipe nightly driver"
  description  = "Runs `embedpipe nightly` on Cloud Run: launches the Dataflow job as embedpipe-worker, builds the index, publishes LATEST."
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "embedpipe-scheduler"
  display_name = "embedpipe nightly schedule"
  description  = "Identity of the Cloud Scheduler job: may execute the embedpipe-nightly Cloud Run job only."
}

# ---------------------------------------------------------------- worker

# Project-level because Dataflow has no narrower scope for these: dataflow.worker lets a VM
# lease work items of jobs in this project; the writers let it send logs and metrics.
resource "google_project_iam_member" "worker" {
  for_each = toset([
    "roles/dataflow.worker",
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
  ])

  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_storage_bucket_iam_member" "worker_data" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_artifact_registry_repository_iam_member" "worker_pull" {
  project    = var.project_id
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.worker.email}"
}

# ---------------------------------------------------------------- driver

# dataflow.developer: create, watch and cancel jobs (no admin over the service's settings).
resource "google_project_iam_member" "driver_dataflow" {
  #checkov:skip=CKV_GCP_49:dataflow.developer is Dataflow's documented minimum role for launching jobs (it has no narrower scope than the project). checkov lists it because a job runs as some service account; here the driver may act as embedpipe-worker only (actAs granted on that one account below) and every job it starts names that account
  project = var.project_id
  role    = "roles/dataflow.developer"
  member  = "serviceAccount:${google_service_account.driver.email}"
}

# To start a job whose workers run as `worker`, the driver must be allowed to act as it;
# granted on that one service account, not project-wide.
resource "google_service_account_iam_member" "driver_acts_as_worker" {
  service_account_id = google_service_account.worker.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.driver.email}"
}

# Reads the previous run, writes the new one and the index, switches LATEST, prunes old runs,
# uploads the job's staging files.
resource "google_storage_bucket_iam_member" "driver_data" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.driver.email}"
}

# Beam may resolve the --sdk_container_image tag to a digest at submission time.
resource "google_artifact_registry_repository_iam_member" "driver_pull" {
  project    = var.project_id
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.driver.email}"
}

# ---------------------------------------------------------------- corpus buckets (read-only)

# The driver lists the corpus to find what changed (generation/size markers); the workers read it.
resource "google_storage_bucket_iam_member" "input_read" {
  for_each = {
    for pair in setproduct(var.input_buckets, ["worker", "driver"]) :
    "${pair[0]}/${pair[1]}" => { bucket = pair[0], who = pair[1] }
  }

  bucket = each.value.bucket
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${each.value.who == "worker" ? google_service_account.worker.email : google_service_account.driver.email}"
}

# ---------------------------------------------------------------- scheduler

# run.invoker on this one job includes run.jobs.run (execute), not overriding its arguments.
resource "google_cloud_run_v2_job_iam_member" "scheduler_runs_nightly" {
  project  = var.project_id
  location = google_cloud_run_v2_job.nightly.location
  name     = google_cloud_run_v2_job.nightly.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.scheduler.email}"
}
