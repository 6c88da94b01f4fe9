output "bucket_name" {
  description = "The data bucket."
  value       = google_storage_bucket.data.name
}

output "bucket_url" {
  description = "The data bucket as a gs:// URL."
  value       = google_storage_bucket.data.url
}

output "root" {
  description = "--root of `embedpipe nightly`: ROOT/runs/<run-id>/ and ROOT/LATEST live here."
  value       = local.root
}

output "latest_path" {
  description = "The pointer to the newest published run (read it to find the current index)."
  value       = "${local.root}/LATEST"
}

output "runs_path" {
  description = "Where the runs are written, one folder per run id."
  value       = "${local.root}/runs/"
}

output "dataflow_temp_location" {
  description = "--temp_location of the Dataflow job."
  value       = "gs://${local.bucket_name}/dataflow/tmp"
}

output "repository_url" {
  description = "Docker repository to push the images to."
  value       = local.registry
}

output "worker_image" {
  description = "--sdk_container_image of the Dataflow job (Dockerfile target worker)."
  value       = local.worker_image
}

output "driver_image" {
  description = "Image of the Cloud Run job (Dockerfile target driver)."
  value       = local.driver_image
}

output "worker_service_account" {
  description = "Service account of the Dataflow workers."
  value       = google_service_account.worker.email
}

output "driver_service_account" {
  description = "Service account of the Cloud Run job that runs `embedpipe nightly`."
  value       = google_service_account.driver.email
}

output "scheduler_service_account" {
  description = "Service account Cloud Scheduler calls the Cloud Run API as."
  value       = google_service_account.scheduler.email
}

output "nightly_job" {
  description = "The Cloud Run job that runs `embedpipe nightly`."
  value       = google_cloud_run_v2_job.nightly.id
}

output "nightly_args" {
  description = "The `embedpipe nightly` arguments the job runs with (also what to pass when running it by hand)."
  value       = local.nightly_args
}

output "run_now_command" {
  description = "Start a night by hand and wait for it."
  value       = "gcloud run jobs execute ${google_cloud_run_v2_job.nightly.name} --project ${var.project_id} --region ${var.region} --wait"
}

output "scheduler_job" {
  description = "The Cloud Scheduler job that starts the nightly run."
  value       = google_cloud_scheduler_job.nightly.id
}
