# embedpipe on Google Cloud: what runs every night, and why it is wired this way.
#
#   Cloud Scheduler ──(OAuth, run.jobs.run)──> Cloud Run job "embedpipe-nightly" (image embedpipe-driver)
#        runs `embedpipe nightly ... --runner DataflowRunner`, which
#          1. submits the Dataflow job (GPU workers, image embedpipe, one SDK process per VM),
#          2. waits for it,
#          3. builds and validates the index, and only then switches ROOT/LATEST.
#
# Why a Cloud Run job and not a Dataflow Flex Template: a Flex Template's launcher must exit as
# soon as the pipeline graph is built (Google's docs: no wait_until_finish; the launch times out
# after 10 minutes), so the steps after the Dataflow job (index, validation, atomic publish)
# would have nowhere to run. See docs/DATAFLOW.md.
#
# The run id: Cloud Scheduler sends a static request, so the schedule cannot pass the date.
# `embedpipe nightly` derives the run id from the UTC start time when --run-id is not given.

locals {
  bucket_name     = coalesce(var.bucket_name, "${var.project_id}-embedpipe")
  bucket_location = coalesce(var.bucket_location, upper(var.region))
  root            = "gs://${local.bucket_name}/${var.root_prefix}"

  registry     = "${var.region}-docker.pkg.dev/${var.project_id}/${var.repository_id}"
  worker_image = "${local.registry}/embedpipe:${var.image_tag}"
  driver_image = "${local.registry}/embedpipe-driver:${var.image_tag}"

  # The GPU each worker VM gets; install-nvidia-driver makes Dataflow install the driver on the
  # VM and mount it into the container (the image carries CUDA and cuDNN, never the driver).
  accelerator = "worker_accelerator=type:${var.gpu_type};count:${var.gpu_count};install-nvidia-driver"

  # Dataflow cancels the job itself 30 minutes before the driver's own timeout: a GPU job must
  # never run on, unwatched, after the process that would publish its result is gone.
  dataflow_max_seconds = max(1800, var.driver_timeout_hours * 3600 - 1800)

  # The `embedpipe nightly` command line. Every element is one argv entry (no shell), so the
  # semicolons in the accelerator option need no quoting. tests/test_infra.py parses this list
  # with Beam's and embedpipe's own option parsers.
  nightly_base_args = [
    "nightly",
    "--input", var.input,
    "--root", local.root,
    "--weights", var.weights,
    "--keep", "${var.keep_runs}",
    "--require-gpu",
    "--runner", "DataflowRunner",
    "--project", var.project_id,
    "--region", var.region,
    "--temp_location", "gs://${local.bucket_name}/dataflow/tmp",
    "--staging_location", "gs://${local.bucket_name}/dataflow/staging",
    "--sdk_container_image", local.worker_image,
    "--sdk_location", "container",
    "--machine_type", var.machine_type,
    "--disk_size_gb", "${var.worker_disk_gb}",
    "--max_num_workers", "${var.max_workers}",
    "--dataflow_service_options", local.accelerator,
    "--dataflow_service_options", "max_workflow_runtime_walltime_seconds=${local.dataflow_max_seconds}",
    # One SDK process per GPU VM: the model loads once and owns the card. Dataflow's default, one
    # process per vCPU, would load it 8 times on a g2-standard-8 and split the GPU memory 8 ways.
    "--experiments", "no_use_multiple_sdk_containers",
    "--service_account_email", google_service_account.worker.email,
    "--labels", "app=embedpipe",
  ]
  nightly_optional_args = concat(
    var.batch_size == null ? [] : ["--batch-size", tostring(var.batch_size)],
    var.use_public_ips ? [] : ["--no_use_public_ips"],
    var.subnetwork == null ? [] : ["--subnetwork", var.subnetwork],
    var.kms_key_name == null ? [] : ["--dataflow_kms_key", var.kms_key_name],
  )
  nightly_args = concat(local.nightly_base_args, local.nightly_optional_args, var.extra_nightly_args)

  # Machine families and the GPUs they take (Compute Engine rules; Dataflow rejects the rest).
  gpu_families = {
    "nvidia-l4"         = ["g2"]
    "nvidia-tesla-t4"   = ["n1"]
    "nvidia-tesla-v100" = ["n1"]
    "nvidia-tesla-p100" = ["n1"]
    "nvidia-tesla-p4"   = ["n1"]
    "nvidia-tesla-a100" = ["a2"]
    "nvidia-a100-80gb"  = ["a2"]
    "nvidia-h100-80gb"  = ["a3"]
  }

  apis = [
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudkms.googleapis.com",
    "cloudscheduler.googleapis.com",
    "compute.googleapis.com",
    "dataflow.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
  ]
}

data "google_project" "this" {
  project_id = var.project_id
}

resource "google_project_service" "apis" {
  for_each = var.enable_apis ? toset(local.apis) : toset([])

  project = var.project_id
  service = each.value
  # Other workloads in the project may use these APIs too: never switch them off on destroy.
  disable_on_destroy = false
}
