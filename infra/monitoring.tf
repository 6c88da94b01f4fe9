# A failed night changes nothing readers see (LATEST stays on the last good run), which is exactly
# why it can go unnoticed for days: page someone when an execution of the driver fails.
resource "google_monitoring_notification_channel" "email" {
  count = var.alert_email == null ? 0 : 1

  project      = var.project_id
  display_name = "embedpipe nightly: ${var.alert_email}"
  type         = "email"
  labels = {
    email_address = var.alert_email
  }

  depends_on = [google_project_service.apis]
}

resource "google_monitoring_alert_policy" "nightly_failed" {
  count = var.alert_email == null ? 0 : 1

  project      = var.project_id
  display_name = "embedpipe nightly failed"
  combiner     = "OR"

  conditions {
    display_name = "embedpipe-nightly execution failed"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_job\" AND resource.labels.job_name = \"${google_cloud_run_v2_job.nightly.name}\" AND metric.type = \"run.googleapis.com/job/completed_execution_count\" AND metric.labels.result = \"failed\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"

      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "The nightly embedpipe run failed and did not publish: ROOT/LATEST still names the previous run. See docs/DATAFLOW.md, \"Watching a night\", for the driver's log and the Dataflow job."
  }

  notification_channels = [google_monitoring_notification_channel.email[0].id]
}
